import { api, hasPath, type Budget, type LedgerEntry, type Report } from "../api";
import { budgetGauge, chartBox, epsilonChart, type EpsilonPoint } from "../charts";
import { badge, fmtNum, fmtTime, h, parseTime, saveBlob, table } from "../dom";
import type { Page } from "../main";
import { Notice, busy, card, emptyState, loading, pageHeader, shortId } from "../ui";
import { unitLabel } from "../unit";

/** The headline (next to the gauge) and the facts (below it). */
function budgetFacts(budget: Budget): { headline: HTMLElement; facts: HTMLElement } {
  const reserved = typeof budget.reserved_epsilon === "number" ? budget.reserved_epsilon : null;
  const share = budget.budget_epsilon > 0 ? (100 * budget.spent_epsilon) / budget.budget_epsilon : 0;
  const row = (term: string, value: string | Node) => [h("dt", null, term), h("dd", null, value)];
  const releases = typeof budget.reserved_releases === "number" ? budget.reserved_releases : null;
  const headline = h(
    "div",
    { class: "headline" },
    h(
      "p",
      { class: "big-number", "data-testid": "budget-summary" },
      h("span", { class: "spent" }, `ε ${fmtNum(budget.spent_epsilon)}`),
      h("span", { class: "muted" }, ` spent of ${fmtNum(budget.budget_epsilon)} (${share.toFixed(0)}%)`),
    ),
    h("p", { class: "remaining" }, `ε ${fmtNum(budget.remaining_epsilon)} remaining`),
    h(
      "ul",
      { class: "legend" },
      h("li", { class: "key-spent" }, "spent"),
      reserved ? h("li", { class: "key-reserved" }, "reserved") : null,
      h("li", { class: "key-remaining" }, "remaining"),
    ),
  );
  const facts = h(
    "dl",
    { class: "facts" },
    reserved !== null
      ? row(
          "Reserved by active runs",
          reserved > 0
            ? `ε ${fmtNum(reserved)}${releases !== null ? ` (${plural(releases, "planned release", "planned releases")})` : ""}`
            : "none",
        )
      : null,
    row("At delta (δ)", String(budget.delta)),
    row("Accountant", budget.accountant.toUpperCase()),
    row("RDP cross-check", `ε ${fmtNum(budget.spent_epsilon_rdp)} (an upper bound)`),
    row("Releases charged", String(budget.events)),
  );
  return { headline, facts };
}

function datasetBudgets(budget: Budget): HTMLElement | null {
  const entries = Object.entries(budget.dataset_budgets ?? {});
  if (!entries.length) return null;
  return table("Datasets with a budget of their own", ["Dataset", "Budget ε"], entries.map(([name, eps]) => [name, fmtNum(eps)]));
}

function chainStatus(report: Report): HTMLElement {
  const c = report.chain;
  const line = (ok: boolean, title: string, detail: string, problem: string | null) =>
    h(
      "li",
      null,
      badge(ok ? "intact" : "broken", ok ? "ok" : "bad"),
      " ",
      h("strong", null, title),
      ` — ${detail}`,
      problem ? h("div", { class: "notice notice-bad" }, problem) : null,
    );
  return h(
    "div",
    { "data-testid": "chain-status" },
    h(
      "p",
      { class: report.chain_ok ? "notice notice-ok" : "notice notice-bad" },
      report.chain_ok
        ? "Both hash chains re-hash cleanly and the budget in force matches its chain."
        : "The record does not check out: see below and the audit report.",
    ),
    h(
      "ul",
      { class: "plain" },
      line(c.ledger_ok, "Ledger", plural(c.ledger_entries, "entry", "entries"), c.ledger_problem),
      line(c.budget_chain_ok && c.budget_matches_tenant, "Budget changes", plural(c.budget_changes, "change", "changes"), c.budget_problem ?? (c.budget_matches_tenant ? null : "The last tenant-wide change differs from the budget in force.")),
      c.checked_head_at === undefined
        ? null
        : c.checked_head_at || c.head_problems?.length
          ? line(
              !c.head_problems?.length,
              "Signed head",
              c.checked_head_at ? `checked against the head signed ${fmtTime(c.checked_head_at)}` : "",
              c.head_problems?.length ? c.head_problems.join(" ") : null,
            )
          : h("li", null, badge("none yet", "muted"), " ", h("strong", null, "Signed head"), " — no earlier signed head to check against"),
      report.independent
        ? h(
            "li",
            null,
            badge(report.independent.agrees ? "agrees" : "differs", report.independent.agrees ? "ok" : "warn"),
            " ",
            h("strong", null, "Independent recomputation"),
            ` — ${report.independent.library}: ε ${fmtNum(report.independent.epsilon)}`,
          )
        : null,
    ),
    h(
      "p",
      { class: "muted small" },
      "Chain heads (keep them: a deleted tail shows only against a known head): ledger ",
      h("code", { class: "wrap" }, c.ledger_head),
      ", budget ",
      h("code", { class: "wrap" }, c.budget_head),
    ),
  );
}

function plural(n: number, one: string, many: string): string {
  return `${n} ${n === 1 ? one : many}`;
}

function ledgerTable(entries: LedgerEntry[]): HTMLElement {
  if (!entries.length) return emptyState("No release has been charged yet.");
  // Newer servers say what each release was for (training, evaluation, ...).
  const purpose = entries.some((e) => typeof e.purpose === "string");
  return table(
    "Ledger entries",
    ["#", "Dataset", ...(purpose ? ["Purpose"] : []), "Unit", "Run", "Round", "Charged", "Noise (σ)", "Sample rate", "Steps", "Clip", "Entry hash"],
    [...entries].reverse().map((e) => [
      String(e.seq),
      e.dataset,
      ...(purpose ? [e.purpose ?? "—"] : []),
      unitLabel(e),
      h("a", { href: `#/runs/${encodeURIComponent(e.run_id)}`, class: "mono" }, shortId(e.run_id)),
      String(e.round),
      fmtTime(e.created_at),
      fmtNum(e.noise_multiplier),
      fmtNum(e.sample_rate, 4),
      String(e.steps),
      fmtNum(e.clip_norm),
      h("code", { title: e.entry_hash }, e.entry_hash.slice(0, 12)),
    ]),
  );
}

const DOWNLOADS: { label: string; path: string; file: (tenant: string) => string }[] = [
  { label: "Audit report (HTML)", path: "/v1/privacy/report?format=html", file: (t) => `fedtext-audit-${t}.html` },
  { label: "Audit report (JSON)", path: "/v1/privacy/report?format=json", file: (t) => `fedtext-audit-${t}.json` },
  { label: "Ledger (JSON Lines)", path: "/v1/privacy/ledger?format=jsonl", file: (t) => `fedtext-ledger-${t}.jsonl` },
  { label: "Ledger (CSV)", path: "/v1/privacy/ledger?format=csv", file: (t) => `fedtext-ledger-${t}.csv` },
];

const SIGNED_HEAD = {
  label: "Signed head (JSON)",
  path: "/v1/privacy/head",
  file: (t: string) => `fedtext-head-${t}.json`,
};

function downloads(tenant: string): HTMLElement {
  const notice = new Notice();
  const row = h("div", { class: "actions" });
  const downloadButton = (d: (typeof DOWNLOADS)[number]) => {
    const button = h("button", { type: "button" }, d.label);
    button.addEventListener("click", () =>
      busy(button, notice, async () => {
        button.textContent = "Preparing…";
        saveBlob(await api.download(d.path), d.file(tenant));
        notice.ok(`Saved ${d.file(tenant)}.`);
      }),
    );
    return button;
  };
  row.append(...DOWNLOADS.map(downloadButton));
  // Servers that sign their ledger heads offer the head on its own, to keep apart.
  void hasPath(SIGNED_HEAD.path).then((yes) => yes && row.append(downloadButton(SIGNED_HEAD)));
  return h(
    "div",
    null,
    h(
      "p",
      { class: "muted" },
      "For auditors: every epsilon in the report is recomposed from the raw ledger entries; ",
      h("code", null, "fedtext audit verify"),
      " re-checks an export offline.",
    ),
    row,
    notice.el,
  );
}

/** What epsilon means, in a few plain sentences (the same as the README's). */
function explainEpsilon(): HTMLElement {
  const p = (...text: (Node | string)[]) => h("p", null, ...text);
  return h(
    "div",
    { class: "stack explain" },
    p(
      h("strong", null, "What it means for your tenant. "),
      "Epsilon (ε) bounds how much anything that leaves your tenant (model updates, released scores) can depend on any one of your examples. At ε = 3, someone who sees everything released cannot tell with confidence whether a given example was in your data: the odds shift by at most a factor e³ (about 20), except with probability δ. Smaller is more private.",
    ),
    p(
      h("strong", null, "Your budget. "),
      "Every release of every run is charged to your tenant's budget; a run that would pass it is refused before it starts. Your admin can raise the budget (",
      h("code", null, "fedtext tenant budget NAME --epsilon E --reason R"),
      ").",
    ),
    p(
      h("strong", null, "Why runs cost less than their sum. "),
      "The ledger composes the privacy loss of all releases together (PRV accounting) instead of adding up each run's ε: two runs of ε 3 cost about 4.5 in total, not 6.",
    ),
    p(
      h("strong", null, "Why a run spends slightly more than its target. "),
      "Training meets the target from below (the noise is searched to within 1%), and the released evaluation of the final models is charged on top: a target of 3 is recorded as about 3.06.",
    ),
  );
}

export const privacyPage: Page = (main, ctx) => {
  const notice = new Notice();
  const { box: gaugeBox, canvas: gaugeCanvas } = chartBox("Privacy budget: spent and remaining epsilon", "gauge");
  const headSlot = h("div", null, loading());
  const budgetSlot = h("div", null);
  const chainSlot = h("div", null, loading());
  const curveSlot = h("div", null, loading());
  const ledgerSlot = h("div", null, loading());
  main.append(
    pageHeader("Privacy", "What your tenant's data has spent, composed from the ledger of every release."),
    notice.el,
    h("div", { class: "columns" }, card("Budget", h("div", { class: "gauge-row" }, gaugeBox, headSlot), budgetSlot), card("Chain status", chainSlot)),
    card("What ε means", explainEpsilon()),
    card("Cumulative ε over time", curveSlot),
    card("Downloads", downloads(ctx.tenant)),
    card("Ledger", ledgerSlot),
  );
  const charts: { destroy(): void }[] = [];
  let stopped = false;

  void (async () => {
    try {
      const budget = await api.budget();
      if (stopped) return;
      const { headline, facts } = budgetFacts(budget);
      headSlot.replaceChildren(headline);
      budgetSlot.replaceChildren(facts, datasetBudgets(budget) ?? "");
      // remaining_epsilon is the API's (net of reservations where the server has them).
      const spent = Math.min(budget.spent_epsilon, budget.budget_epsilon);
      const reserved = typeof budget.reserved_epsilon === "number" ? budget.reserved_epsilon : 0;
      charts.push(
        budgetGauge(gaugeCanvas, {
          spent,
          reserved: Math.max(0, Math.min(reserved, budget.budget_epsilon - spent)),
          remaining: Math.max(0, budget.remaining_epsilon),
        }),
      );
    } catch (err) {
      if (!stopped) notice.error(err);
      headSlot.replaceChildren();
    }
  })();

  void api.ledger().then(
    (entries) => !stopped && ledgerSlot.replaceChildren(ledgerTable(entries)),
    (err) => !stopped && ledgerSlot.replaceChildren(errorLine(err)),
  );

  void api.report().then(
    (report) => {
      if (stopped) return;
      chainSlot.replaceChildren(chainStatus(report));
      const points: EpsilonPoint[] = report.rounds
        .filter((r) => r.cumulative_epsilon !== null)
        .map((r) => ({ t: parseTime(r.created_at), epsilon: r.cumulative_epsilon as number, label: `run ${shortId(r.run_id)} round ${r.round}` }));
      if (!points.length) {
        curveSlot.replaceChildren(emptyState("Nothing spent yet: the curve starts with the first charged round."));
        return;
      }
      const { box, canvas } = chartBox("Cumulative epsilon after each charged round, with the budget line");
      curveSlot.replaceChildren(box);
      charts.push(epsilonChart(canvas, points, report.budget_epsilon));
    },
    (err) => {
      if (stopped) return;
      chainSlot.replaceChildren(errorLine(err));
      curveSlot.replaceChildren();
    },
  );

  return () => {
    stopped = true;
    for (const chart of charts) chart.destroy();
  };
};

function errorLine(err: unknown): HTMLElement {
  const n = new Notice();
  n.error(err);
  return n.el;
}
