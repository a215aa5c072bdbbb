import { ApiError } from "./api";
import { h } from "./dom";

export function messageOf(err: unknown): string {
  if (err instanceof ApiError) return err.message;
  if (err instanceof Error) return err.message;
  return String(err);
}

/** A slot for one message; role=alert for errors so screen readers announce them. */
export class Notice {
  readonly el = h("div", { class: "notice-slot" });

  error(err: unknown): void {
    const status = err instanceof ApiError && err.status ? ` (${err.status})` : "";
    this.el.replaceChildren(
      h("p", { class: "notice notice-bad", role: "alert" }, messageOf(err), h("span", { class: "muted" }, status)),
    );
  }

  ok(text: string): void {
    this.el.replaceChildren(h("p", { class: "notice notice-ok", role: "status" }, text));
  }

  clear(): void {
    this.el.replaceChildren();
  }
}

/** Run ``action`` with the button disabled; errors go to ``notice``. */
export async function busy(
  button: HTMLButtonElement,
  notice: Notice,
  action: () => Promise<void>,
): Promise<void> {
  const label = button.textContent;
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  notice.clear();
  try {
    await action();
  } catch (err) {
    notice.error(err);
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    button.textContent = label;
  }
}

export function pageHeader(title: string, intro?: string, ...actions: Node[]): HTMLElement {
  return h(
    "header",
    { class: "page-header" },
    h(
      "div",
      null,
      h("h1", { tabindex: -1 }, title),
      intro ? h("p", { class: "lede" }, intro) : null,
    ),
    actions.length ? h("div", { class: "actions" }, actions) : null,
  );
}

let fieldSeq = 0;

/** A labelled control; ``hint`` is tied to it with aria-describedby. */
export function field(
  label: string,
  control: HTMLInputElement | HTMLSelectElement | HTMLTextAreaElement,
  hint?: string,
): HTMLElement {
  const id = control.id || `f${++fieldSeq}`;
  control.id = id;
  const hintEl = hint ? h("small", { id: `${id}-hint`, class: "hint" }, hint) : null;
  if (hintEl) control.setAttribute("aria-describedby", hintEl.id);
  return h("div", { class: "field" }, h("label", { for: id }, label), control, hintEl);
}

export function card(title: string | null, ...children: (Node | null)[]): HTMLElement {
  return h("section", { class: "card" }, title ? h("h2", null, title) : null, children);
}

export function loading(): HTMLElement {
  return h("p", { class: "muted", role: "status" }, "Loading…");
}

export function emptyState(text: string): HTMLElement {
  return h("p", { class: "empty" }, text);
}

export function shortId(id: string): string {
  return id.length > 10 ? id.slice(0, 8) : id;
}
