import { api, type Key } from "../api";
import { badge, fmtTime, h, table } from "../dom";
import type { Page } from "../main";
import { Notice, busy, card, emptyState, field, loading, pageHeader } from "../ui";

function keyStatus(key: Key): HTMLElement {
  if (key.revoked_at) return badge("revoked", "muted");
  if (key.expires_at && Date.parse(key.expires_at.endsWith("Z") ? key.expires_at : `${key.expires_at}Z`) <= Date.now()) {
    return badge("expired", "muted");
  }
  return badge("active", "ok");
}

/** The new secret, shown once, with a copy button; dismissing it forgets it. */
function secretPanel(secret: string, key: Key, onDone: () => void): HTMLElement {
  const value = h("input", { type: "text", readonly: true, value: secret, class: "mono", "aria-label": "New API key secret" });
  const copy = h("button", { type: "button" }, "Copy");
  const copied = h("span", { class: "muted", role: "status" });
  copy.addEventListener("click", async () => {
    value.select();
    try {
      await navigator.clipboard.writeText(secret);
      copied.textContent = "Copied.";
    } catch {
      copied.textContent = "Select the text and copy it.";
    }
  });
  const done = h("button", { type: "button", class: "primary" }, "I have stored it");
  done.addEventListener("click", onDone);
  const panel = h(
    "div",
    { class: "secret", role: "region", "aria-label": "New key secret", "data-testid": "new-secret" },
    h("p", null, h("strong", null, `Key “${key.name || key.prefix}” created.`), " Store the secret now: it is shown this once and cannot be recovered."),
    h("div", { class: "secret-row" }, value, copy),
    copied,
    h("div", { class: "actions" }, done),
  );
  return panel;
}

export const keysPage: Page = (main, ctx) => {
  const notice = new Notice();
  const createNotice = new Notice();
  const listSlot = h("div", null, loading());
  const secretSlot = h("div", null);
  const name = h("input", { type: "text", name: "name", maxlength: 100, autocomplete: "off", placeholder: "web shop predictions" });
  const predict = h("input", { type: "checkbox", name: "scope", value: "predict", checked: true });
  const admin = h("input", { type: "checkbox", name: "scope", value: "admin" });
  const expires = h("input", { type: "date", name: "expires" });
  const submit = h("button", { type: "submit", class: "primary" }, "Create key");
  const form = h(
    "form",
    { class: "stack", "aria-label": "Create a key" },
    h(
      "div",
      { class: "grid" },
      field("Name", name, "What the key is for; shown in the list."),
      h(
        "fieldset",
        { class: "field" },
        h("legend", null, "Scopes"),
        h("label", { class: "checkbox" }, predict, " predict — get predictions"),
        h("label", { class: "checkbox" }, admin, " admin — everything on this console"),
      ),
      field("Expires (optional)", expires, "At the end of that day, UTC."),
    ),
    createNotice.el,
    h("div", { class: "actions" }, submit),
  );
  main.append(
    pageHeader("Keys", "API keys of your tenant. A predict key can only get predictions; an admin key can do everything here."),
    card("Create a key", secretSlot, form),
    card("Keys", notice.el, listSlot),
  );
  let stopped = false;

  function renderList(keys: Key[]): void {
    if (!keys.length) {
      listSlot.replaceChildren(emptyState("No keys."));
      return;
    }
    listSlot.replaceChildren(
      table(
        "API keys",
        ["Name", "Prefix", "Scopes", "Status", "Created", "Expires", ""],
        [...keys].reverse().map((key) => {
          const mine = key.prefix === ctx.keyPrefix;
          return [
            h("span", null, key.name || h("span", { class: "muted" }, "(unnamed)"), mine ? badge("this session", "info") : null),
            h("code", null, key.prefix),
            key.scopes.join(", "),
            keyStatus(key),
            fmtTime(key.created_at),
            fmtTime(key.expires_at),
            key.revoked_at ? "" : revokeControl(key, mine),
          ];
        }),
        { cards: true },
      ),
    );
  }

  function revokeControl(key: Key, mine: boolean): HTMLElement {
    const slot = h("span", { class: "inline-actions" });
    const label = key.name || key.prefix;
    const revoke = h("button", { type: "button", class: "small danger-outline", "aria-label": `Revoke key ${label}` }, "Revoke");
    revoke.addEventListener("click", () => {
      const yes = h("button", { type: "button", class: "small danger", "aria-label": `Confirm: revoke key ${label}` }, "Confirm revoke");
      const no = h("button", { type: "button", class: "small ghost" }, "Keep");
      no.addEventListener("click", () => {
        slot.replaceChildren(revoke);
        revoke.focus();
      });
      yes.addEventListener("click", () =>
        busy(yes, notice, async () => {
          await api.revokeKey(key.id);
          if (mine) {
            ctx.signOut("You revoked the key this session used. Sign in with another admin key.");
            return;
          }
          notice.ok(`Key “${label}” revoked: it stops working at once.`);
          await load();
        }),
      );
      slot.replaceChildren(mine ? h("span", { class: "warn-text" }, "This signs you out. ") : "", yes, no);
      yes.focus();
    });
    slot.replaceChildren(revoke);
    return slot;
  }

  async function load(): Promise<void> {
    try {
      const keys = await api.keys();
      if (!stopped) renderList(keys);
    } catch (err) {
      if (!stopped) notice.error(err);
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void busy(submit, createNotice, async () => {
      const scopes = [predict, admin].filter((c) => c.checked).map((c) => c.value);
      if (!scopes.length) throw new Error("Choose at least one scope.");
      const body: { name: string; scopes: string[]; expires_at?: string } = { name: name.value.trim(), scopes };
      if (expires.value) body.expires_at = `${expires.value}T23:59:59Z`;
      const created = await api.createKey(body);
      form.reset();
      predict.checked = true;
      const panel = secretPanel(created.secret, created.key, () => {
        secretSlot.replaceChildren();
        name.focus();
      });
      secretSlot.replaceChildren(panel);
      panel.querySelector("input")?.focus();
      await load();
    });
  });

  void load();
  return () => {
    stopped = true;
    secretSlot.replaceChildren(); // the secret is not kept once the page is left
  };
};
