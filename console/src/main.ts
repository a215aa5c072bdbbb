import "./style.css";
import { api, keyPrefix, setUnauthorizedHandler, storedKey, storeKey } from "./api";
import { h } from "./dom";
import { keysPage } from "./pages/keys";
import { modelsPage } from "./pages/models";
import { partnersPage } from "./pages/partners";
import { privacyPage } from "./pages/privacy";
import { runPage, runsPage } from "./pages/runs";
import { Notice, field } from "./ui";

export interface PageContext {
  tenant: string;
  /** The prefix of the key this tab signed in with, to mark it in the key list. */
  keyPrefix: string | null;
  navigate(hash: string): void;
  signOut(message?: string): void;
}

/** Renders into ``main``; returns what stops its timers and charts when the page is left. */
export type Page = (main: HTMLElement, ctx: PageContext, params: string[]) => (() => void) | void;

const NAV: { hash: string; label: string }[] = [
  { hash: "#/runs", label: "Runs" },
  { hash: "#/models", label: "Models" },
  { hash: "#/privacy", label: "Privacy" },
  { hash: "#/keys", label: "Keys" },
  { hash: "#/partners", label: "Partners" },
];

const root = document.getElementById("app") as HTMLElement;
let leave: (() => void) | void;

function route(): { page: Page; params: string[]; section: string } {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  switch (parts[0]) {
    case "runs":
      return parts[1] ? { page: runPage, params: [parts[1]], section: "#/runs" } : { page: runsPage, params: [], section: "#/runs" };
    case "models":
      return { page: modelsPage, params: [], section: "#/models" };
    case "privacy":
      return { page: privacyPage, params: [], section: "#/privacy" };
    case "keys":
      return { page: keysPage, params: [], section: "#/keys" };
    case "partners":
      return { page: partnersPage, params: [], section: "#/partners" };
    default:
      return { page: runsPage, params: [], section: "#/runs" };
  }
}

function signOut(message?: string): void {
  storeKey(null);
  if (leave) leave();
  leave = undefined;
  window.removeEventListener("hashchange", onHashChange);
  showSignIn(message);
}

function showSignIn(message?: string): void {
  const notice = new Notice();
  if (message) notice.error(new Error(message));
  const input = h("input", {
    type: "password",
    name: "admin-key",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    placeholder: "ftk_…",
  });
  const button = h("button", { type: "submit", class: "primary" }, "Sign in");
  // method=post: should the script ever fail to load, the key would never reach a URL.
  const form = h(
    "form",
    { class: "signin-form", method: "post", action: "#", "aria-labelledby": "signin-title" },
    field("Admin API key", input, "Kept in this browser tab only (session storage); closing the tab signs you out."),
    button,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    button.disabled = true;
    notice.clear();
    try {
      const budget = await api.signIn(key);
      storeKey(key);
      input.value = "";
      showShell(budget.tenant);
    } catch (err) {
      notice.error(err);
      input.focus();
      input.select();
    } finally {
      button.disabled = false;
    }
  });
  root.replaceChildren(
    h(
      "main",
      { id: "main", class: "signin" },
      h(
        "div",
        { class: "signin-card" },
        h("p", { class: "brand brand-dark" }, h("span", { class: "logo", "aria-hidden": "true" }), "fedtext"),
        h("h1", { id: "signin-title" }, "Tenant console"),
        h(
          "p",
          { class: "lede" },
          "Training runs, model versions, privacy budget and API keys of your tenant. Sign in with an admin key.",
        ),
        notice.el,
        form,
      ),
    ),
  );
  input.focus();
}

function onHashChange(): void {
  render();
}

let context: PageContext | null = null;

function showShell(tenant: string): void {
  context = {
    tenant,
    keyPrefix: keyPrefix(storedKey()),
    navigate: (hash: string) => {
      if (location.hash === hash) render();
      else location.hash = hash;
    },
    signOut,
  };
  const nav = h(
    "nav",
    { class: "tabs", "aria-label": "Sections" },
    h("ul", null, NAV.map((item) => h("li", null, h("a", { href: item.hash, "data-section": item.hash }, item.label)))),
  );
  // Choosing the section already shown fires no hashchange: still take focus to its heading.
  nav.addEventListener("click", (event) => {
    const link = (event.target as Element).closest("a");
    if (link && link.getAttribute("href") === location.hash) {
      root.querySelector<HTMLElement>("main h1")?.focus({ preventScroll: true });
    }
  });
  const signOutButton = h("button", { type: "button", class: "ghost" }, "Sign out");
  signOutButton.addEventListener("click", () => signOut());
  root.replaceChildren(
    h(
      "header",
      { class: "topbar" },
      h(
        "div",
        { class: "topbar-inner" },
        h("a", { class: "brand", href: "#/runs" }, h("span", { class: "logo", "aria-hidden": "true" }), "fedtext"),
        h("span", { class: "tenant", title: "Signed-in tenant" }, h("span", { class: "visually-hidden" }, "Tenant: "), tenant),
        signOutButton,
      ),
      h("div", { class: "topbar-inner" }, nav),
    ),
    h("main", { id: "main", class: "content", tabindex: -1 }),
  );
  window.addEventListener("hashchange", onHashChange);
  if (!location.hash) history.replaceState(null, "", "#/runs");
  render();
}

function render(): void {
  if (!context) return;
  if (leave) leave();
  const { page, params, section } = route();
  for (const link of root.querySelectorAll<HTMLAnchorElement>(".tabs a")) {
    if (link.dataset.section === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const main = root.querySelector("main") as HTMLElement;
  main.replaceChildren();
  leave = page(main, context, params);
  const title = main.querySelector("h1");
  document.title = `${title?.textContent ?? "Console"} · fedtext`;
  // Move focus to the new page's heading, as a full page load would for a screen reader.
  title?.focus({ preventScroll: true });
}

setUnauthorizedHandler(() => signOut("Your key is no longer valid (revoked or expired). Sign in again."));

async function start(): Promise<void> {
  const key = storedKey();
  if (!key) {
    showSignIn();
    return;
  }
  try {
    showShell((await api.signIn(key)).tenant);
  } catch (err) {
    storeKey(null);
    showSignIn(err instanceof Error ? err.message : undefined);
  }
}

void start();
