import { api } from "../api";
import { h } from "../dom";
import type { Page } from "../main";
import { Notice, busy, card, emptyState, field, loading, pageHeader } from "../ui";

export const partnersPage: Page = (main, ctx) => {
  const notice = new Notice();
  const listSlot = h("div", null, loading());
  const input = h("input", { type: "text", name: "tenant", autocomplete: "off", required: true, placeholder: "acme" });
  const add = h("button", { type: "submit", class: "primary" }, "Add partner");
  const form = h(
    "form",
    { class: "inline-form", "aria-label": "Add a partner" },
    field("Tenant name", input),
    add,
  );
  main.append(
    pageHeader(
      "Partners",
      `Tenants listed here may start training runs that include ${ctx.tenant}. Such a run trains on your data and spends your privacy budget; your budget is still checked before each run.`,
    ),
    card("Consent", notice.el, listSlot, form),
  );
  let current: string[] = [];
  let stopped = false;

  function render(): void {
    if (!current.length) {
      listSlot.replaceChildren(emptyState("No partner may include your tenant in a run."));
      return;
    }
    listSlot.replaceChildren(
      h(
        "ul",
        { class: "chips", "aria-label": "Partners" },
        current.map((name) => {
          const remove = h("button", { type: "button", class: "small ghost", "aria-label": `Withdraw consent from ${name}` }, "Remove");
          remove.addEventListener("click", () =>
            busy(remove, notice, async () => {
              current = (await api.setPartners(current.filter((n) => n !== name))).tenants;
              render();
              notice.ok(`${name} can no longer include ${ctx.tenant} in new runs (runs already started go on).`);
              input.focus();
            }),
          );
          return h("li", null, h("span", null, name), remove);
        }),
      ),
    );
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = input.value.trim();
    if (!name) return;
    void busy(add, notice, async () => {
      current = (await api.setPartners([...current.filter((n) => n !== name), name])).tenants;
      input.value = "";
      render();
      notice.ok(`${name} may now include ${ctx.tenant} in its runs.`);
    });
  });

  void api.partners().then(
    (p) => {
      if (stopped) return;
      current = p.tenants;
      render();
    },
    (err) => !stopped && notice.error(err),
  );
  return () => {
    stopped = true;
  };
};
