// Released held-out figures, always with their uncertainty: one way to show them on Runs
// and Models, so the same number reads the same everywhere.

import type { ReleasedMetrics } from "./api";
import { fmtNum, h } from "./dom";

/** "0.62 ± 0.05" with the interval as a tooltip; "—" when nothing was released. */
export function withUncertainty(
  value: number | null | undefined,
  sd: number | null | undefined,
  low?: number | null,
  high?: number | null,
): HTMLElement {
  if (typeof value !== "number") return h("span", null, "—");
  const interval = typeof low === "number" && typeof high === "number" ? `95% interval ${fmtNum(low, 2)}–${fmtNum(high, 2)}` : undefined;
  return h(
    "span",
    { class: "uncertain", title: interval },
    fmtNum(value, 2),
    typeof sd === "number" ? h("span", { class: "muted" }, ` ± ${fmtNum(sd, 2)}`) : null,
  );
}

/** The released final figures of a run or version: each with its SD and 95% interval, the
 * warning when they are too uncertain to compare models, and why this model serves (or not). */
export function releasedFigures(r: ReleasedMetrics): HTMLElement {
  const level = r.confidence ? `${Math.round(r.confidence * 100)}%` : "95%";
  const range = (low: number | null, high: number | null) =>
    typeof low === "number" && typeof high === "number" ? `${fmtNum(low, 2)} – ${fmtNum(high, 2)}` : "—";
  const row = (term: string, ...value: (Node | string)[]) => [h("dt", null, term), h("dd", null, ...value)];
  return h(
    "div",
    { class: "stack released" },
    h(
      "dl",
      { class: "figures", "aria-label": "Released final figures" },
      row("Model", r.model === "personalized" ? "personalized (the tenant's own fine-tune)" : "global (the federation's)"),
      row("Accuracy", withUncertainty(r.accuracy, r.accuracy_sd), h("span", { class: "muted" }, ` (${level} interval ${range(r.accuracy_low, r.accuracy_high)})`)),
      row("Macro-F1", withUncertainty(r.macro_f1, r.macro_f1_sd), h("span", { class: "muted" }, ` (${level} interval ${range(r.macro_f1_low, r.macro_f1_high)})`)),
      row("Test examples", typeof r.test_examples === "number" ? `≈ ${fmtNum(r.test_examples, 0)}${typeof r.test_examples_sd === "number" ? ` (released with noise SD ${fmtNum(r.test_examples_sd, 1)})` : ""}` : "—"),
      r.version != null ? row("Version", `v${r.version}`) : [],
    ),
    r.uncertainty_warning ? h("p", { class: "notice notice-warn", role: "note" }, r.uncertainty_warning) : null,
    r.model_choice ? h("p", { class: "muted" }, h("strong", null, "Which model: "), r.model_choice) : null,
    r.deploy_reason ? h("p", { class: "muted" }, h("strong", null, "Deployment: "), r.deploy_reason) : null,
    h(
      "p",
      { class: "muted small" },
      "± is one standard deviation of the released figure: the DP noise added to each count plus the test set's own sampling. Two models whose intervals overlap may be equally good.",
    ),
  );
}
