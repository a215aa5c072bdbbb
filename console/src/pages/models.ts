import { api, type ModelSummary, type ModelVersion, type Prediction } from "../api";
import { badge, fmtBytes, fmtTime, h, table } from "../dom";
import type { Page } from "../main";
import { withUncertainty } from "../released";
import { Notice, busy, card, emptyState, field, loading, pageHeader, shortId } from "../ui";

// Sentences the demo's models (`fedtext demo`, encoder-head) classify right, one per label:
// checked against a real demo model (tests/serving/test_console.py tries the first).
export const SAMPLES: [string, string][] = [
  ["positive", "Thank you so much, the crew was wonderful and the flight was perfect!"],
  ["negative", "Worst airline ever: two hours late and they lost my bag."],
  ["neutral", "JetBlue is adding flights from Boston to Florida in March."],
];

function num(value: unknown): number | null {
  return typeof value === "number" ? value : null;
}

function metricsCell(version: ModelVersion): HTMLElement {
  // Newer servers release each figure with its uncertainty (`released`); older ones only
  // the bare figures in `metrics`.
  const r = version.released;
  const m = version.metrics;
  const shown: [string, HTMLElement][] = r
    ? [
        ["accuracy", withUncertainty(r.accuracy, r.accuracy_sd, r.accuracy_low, r.accuracy_high)],
        ["macro-F1", withUncertainty(r.macro_f1, r.macro_f1_sd, r.macro_f1_low, r.macro_f1_high)],
      ]
    : [
        ["accuracy", withUncertainty(num(m.accuracy), null)],
        ["macro-F1", withUncertainty(num(m.macro_f1), null)],
      ];
  const personalized = r ? r.model === "personalized" : m.personalized === true;
  return h(
    "span",
    { class: "metric-pair" },
    shown.map(([name, value]) => h("span", null, h("span", { class: "muted" }, `${name} `), value)),
    personalized ? badge("personalized", "muted") : null,
    r?.uncertainty_warning ? h("span", { class: "notice-warn small", title: r.uncertainty_warning }, "too uncertain to compare") : null,
  );
}

function specCell(version: ModelVersion): HTMLElement {
  const spec = version.spec;
  const labels = Array.isArray(spec.labels) ? (spec.labels as string[]).join(", ") : "";
  return h(
    "details",
    { class: "spec" },
    h("summary", null, `${String(spec.family ?? "?")}${labels ? ` · ${labels}` : ""}`),
    h("pre", { class: "json" }, JSON.stringify({ spec, metrics: version.metrics }, null, 2)),
  );
}

function tryIt(models: ModelSummary[]): HTMLElement {
  const served = models.filter((m) => m.deployed_version !== null);
  if (!served.length) return emptyState("Deploy a version to try it here.");
  const notice = new Notice();
  const model = h("select", { name: "model" }, served.map((m) => h("option", { value: m.name }, `${m.name} (v${m.deployed_version})`)));
  const text = h("textarea", {
    name: "text",
    rows: 3,
    required: true,
    maxlength: 2000,
    placeholder: SAMPLES[0][1],
  });
  const samples = h(
    "div",
    { class: "actions samples", role: "group", "aria-label": "Examples to try" },
    h("span", { class: "muted" }, "Try: "),
    SAMPLES.map(([label, sentence]) => {
      const b = h("button", { type: "button", class: "ghost small", title: sentence }, `a ${label} one`);
      b.addEventListener("click", () => {
        text.value = sentence;
        form.requestSubmit();
      });
      return b;
    }),
  );
  const topK = h("select", { name: "top_k" }, [1, 2, 3].map((k) => h("option", { value: k }, String(k))));
  topK.value = "3";
  const submit = h("button", { type: "submit", class: "primary" }, "Predict");
  const result = h("div", { class: "prediction", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "stack narrow", "aria-label": "Try a model" },
    h("div", { class: "grid" }, field("Model", model), field("Labels to show", topK)),
    field("Sentence", text, "Sent to the deployed version with your admin key; nothing is stored."),
    samples,
    notice.el,
    h("div", { class: "actions" }, submit),
    result,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void busy(submit, notice, async () => {
      result.replaceChildren();
      const answer: Prediction = await api.predict(model.value, text.value, Number(topK.value));
      result.replaceChildren(
        h("p", { class: "muted" }, `${answer.model} v${answer.version}`),
        h(
          "ol",
          { class: "scores" },
          answer.predictions[0].map((p) =>
            h(
              "li",
              null,
              h("span", { class: "label" }, p.label),
              h("meter", { min: 0, max: 1, value: p.score, "aria-label": `${p.label} score` }),
              h("span", { class: "score" }, `${(p.score * 100).toFixed(1)}%`),
            ),
          ),
        ),
      );
    });
  });
  // Ctrl/Cmd+Enter predicts from the text box, as in most chat and search boxes.
  text.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  return form;
}

function modelCard(
  summary: ModelSummary,
  versions: ModelVersion[],
  reload: (flash: string) => void,
  flash?: string,
): HTMLElement {
  const notice = new Notice();
  if (flash) notice.ok(flash);
  const deployed = versions.find((v) => v.deployed);
  const canRollBack = deployed !== undefined && versions.some((v) => v.version < deployed.version);
  const rollback = h("button", { type: "button", class: "ghost", disabled: !canRollBack }, "Roll back");
  rollback.title = canRollBack ? "Deploy the newest version older than the serving one" : "No older version to roll back to";
  rollback.addEventListener("click", () =>
    busy(rollback, notice, async () => {
      const row = await api.rollback(summary.name);
      reload(`Rolled back: version ${row.version} of ${row.name} now serves.`);
    }),
  );
  const rows = [...versions].reverse().map((v) => {
    let status: Node;
    if (v.deployed) {
      status = badge("serving", "ok");
    } else {
      const deploy = h("button", { type: "button", class: "small" }, "Deploy");
      deploy.setAttribute("aria-label", `Deploy version ${v.version} of ${v.name}`);
      deploy.addEventListener("click", () =>
        busy(deploy, notice, async () => {
          const row = await api.deploy(v.name, v.version);
          reload(`Deployed: version ${row.version} of ${row.name} now serves.`);
        }),
      );
      status = deploy;
    }
    return [
      h("strong", null, `v${v.version}`),
      status,
      metricsCell(v),
      specCell(v),
      v.run_id ? h("a", { href: `#/runs/${encodeURIComponent(v.run_id)}`, class: "mono" }, shortId(v.run_id)) : "—",
      fmtBytes(v.size_bytes),
      fmtTime(v.created_at),
    ];
  });
  return h(
    "section",
    { class: "card model", "aria-labelledby": `model-${summary.name}` },
    h(
      "div",
      { class: "card-head" },
      h("h2", { id: `model-${summary.name}`, tabindex: -1 }, summary.name, " ", deployed ? badge(`v${deployed.version} serving`, "ok") : badge("not deployed", "warn")),
      rollback,
    ),
    notice.el,
    table(`Versions of ${summary.name}`, ["Version", "Status", "Metrics", "Spec", "Run", "Size", "Created"], rows, {
      cards: true,
    }),
  );
}

export const modelsPage: Page = (main) => {
  const notice = new Notice();
  const trySlot = h("div", null, loading());
  const list = h("div", { class: "stack" });
  main.append(
    pageHeader("Models", "Your tenant's model versions, encrypted at rest. One version per model serves predictions."),
    notice.el,
    list,
    card("Try it", trySlot),
  );
  let stopped = false;

  async function load(flash?: { model: string; text: string }): Promise<void> {
    try {
      const models = await api.models();
      const versions = await Promise.all(models.map((m) => api.versions(m.name)));
      if (stopped) return;
      notice.clear();
      trySlot.replaceChildren(tryIt(models));
      list.replaceChildren(
        ...(models.length
          ? models.map((m, i) =>
              modelCard(
                m,
                versions[i],
                (text) => void load({ model: m.name, text }),
                flash?.model === m.name ? flash.text : undefined,
              ),
            )
          : [card(null, emptyState("No model versions yet: a completed run stores one per tenant."))]),
      );
      // The clicked button is gone: keyboard focus goes to the model it changed.
      if (flash) document.getElementById(`model-${flash.model}`)?.focus();
    } catch (err) {
      if (!stopped) notice.error(err);
    }
  }

  void load();
  return () => {
    stopped = true;
  };
};
