// A tiny element builder: text goes in through textContent only (never innerHTML), so
// API data cannot become markup.

type Child = Node | string | number | null | undefined | false;
type Attrs = Record<string, string | number | boolean | null | undefined | EventListener>;

export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs | null = null,
  ...children: (Child | Child[])[]
): HTMLElementTagNameMap[K] {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "class") {
      el.className = String(value);
    } else if (value === true) {
      el.setAttribute(name, "");
    } else {
      el.setAttribute(name, String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(parent: Node, children: (Child | Child[])[]): void {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    parent.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el: Element): void {
  el.replaceChildren();
}

export function fmtTime(iso: string | null | undefined): string {
  if (!iso) return "—";
  // The API sends UTC; show it in the viewer's zone, to the minute.
  const d = new Date(iso.endsWith("Z") || /[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
  return d.toLocaleString(undefined, {
    year: "numeric",
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
  });
}

export function parseTime(iso: string): number {
  return Date.parse(iso.endsWith("Z") || /[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
}

export function fmtNum(value: unknown, digits = 3): string {
  if (typeof value !== "number" || !Number.isFinite(value)) return "—";
  return value.toLocaleString(undefined, { maximumFractionDigits: digits });
}

export function fmtBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 ** 2).toFixed(1)} MiB`;
}

/**
 * A table that scrolls sideways inside its box on narrow screens, never the page; with
 * ``cards``, each row becomes a card of labelled cells on a phone instead.
 */
export function table(
  caption: string,
  head: string[],
  rows: (Child | Child[])[][],
  options: { cards?: boolean } = {},
): HTMLElement {
  return h(
    "div",
    { class: options.cards ? "table-wrap cards" : "table-wrap", role: "region", "aria-label": caption, tabindex: 0 },
    h(
      "table",
      null,
      h("caption", { class: "visually-hidden" }, caption),
      h("thead", null, h("tr", null, head.map((t) => h("th", { scope: "col" }, t)))),
      h(
        "tbody",
        null,
        rows.map((cells) => h("tr", null, cells.map((c, i) => h("td", { "data-label": head[i] || null }, c as Child)))),
      ),
    ),
  );
}

export function badge(text: string, tone: "ok" | "warn" | "bad" | "info" | "muted"): HTMLElement {
  return h("span", { class: `badge badge-${tone}` }, text);
}

/** Save bytes as a file without putting the key in a URL: fetched with the header, then a blob. */
export function saveBlob(blob: Blob, filename: string): void {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: filename, class: "visually-hidden" });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
