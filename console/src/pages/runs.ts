import { ApiError, api, runChoices, type Choices, type Run, type RoundMetric } from "../api";
import { chartBox, roundsChart, updateRoundsChart, type RoundsChart, type RoundSeries } from "../charts";
import { badge, fmtNum, fmtTime, h, table } from "../dom";
import type { Page } from "../main";
import { releasedFigures, withUncertainty } from "../released";
import { Notice, busy, card, emptyState, field, loading, pageHeader, shortId } from "../ui";
import { runUnit } from "../unit";

const ACTIVE = new Set(["created", "running"]);
const LIST_REFRESH_MS = 3000;
const RUN_REFRESH_MS = 2000;

export function statusBadge(status: string): HTMLElement {
  const tone =
    status === "completed" ? "ok" : status === "failed" ? "bad" : ACTIVE.has(status) ? "info" : "warn";
  return badge(status, tone);
}

function lastEvaluation(run: Run): RoundMetric | undefined {
  return run.metrics.filter((m) => m.phase === "evaluate").at(-1);
}

function progress(run: Run): HTMLElement {
  const done = Math.min(run.checkpoint_round, run.rounds);
  return h(
    "span",
    { class: "progress-cell" },
    h("progress", { max: Math.max(run.rounds, 1), value: done, "aria-label": `${done} of ${run.rounds} rounds` }),
    ` ${done}/${run.rounds}`,
  );
}

/** A number field; with no value it is left out of the request and the server's default applies. */
function numberInput(name: string, value: number | null, min: number, max: number, step = 1): HTMLInputElement {
  return h("input", {
    type: "number",
    name,
    value: value ?? undefined,
    min,
    max,
    step,
    inputmode: step < 1 ? "decimal" : "numeric",
    placeholder: value === null ? "family default" : undefined,
  });
}

function select(name: string, options: [string, string][], value = ""): HTMLSelectElement {
  const el = h("select", { name }, options.map(([v, label]) => h("option", { value: v }, label)));
  el.value = value;
  return el;
}

const FAMILY_NAMES: Record<string, string> = {
  "encoder-head": "Encoder + private head",
  lstm: "LSTM (from scratch)",
  transformer: "Transformer (from scratch)",
  minilm: "MiniLM (top layers tuned)",
};
const STRATEGY_NAMES: Record<string, string> = { fedavg: "FedAvg", fedprox: "FedProx", fedadam: "FedAdam" };
const PARTITION_NAMES: Record<string, string> = { iid: "IID", dirichlet: "Dirichlet (label skew)", topic: "By topic" };
const DEPLOY_NAMES: Record<string, string> = {
  "if-better": "If significantly better",
  first: "Only a first version",
  always: "Always",
  never: "Never (deploy by hand)",
};
// Used only when the server's /openapi.json cannot be read: the API's own enums otherwise.
const FALLBACK_CHOICES: Record<string, Choices> = {
  model: { options: ["encoder-head", "lstm", "transformer", "minilm"], default: "encoder-head" },
  strategy: { options: ["fedavg", "fedprox", "fedadam"], default: "fedavg" },
  partitioning: { options: ["iid", "dirichlet", "topic"], default: null },
  deploy: { options: ["if-better", "first", "always", "never"], default: "if-better" },
};

/** A select over the schema's choices; with no default, a first "server default" option. */
function choiceSelect(name: string, choices: Choices, names: Record<string, string>): HTMLSelectElement {
  const options: [string, string][] = choices.options.map((v) => [v, names[v] ?? v]);
  if (choices.default === null) options.unshift(["", "server default"]);
  return select(name, options, choices.default ?? "");
}

function startForm(
  tenant: string,
  partners: string[],
  choices: Record<string, Choices>,
  onStarted: (run: Run) => void,
): HTMLElement {
  const notice = new Notice();
  const participants = h("input", {
    type: "text",
    name: "participants",
    list: "partner-names",
    autocomplete: "off",
    required: true,
    placeholder: "globex, initech",
  });
  const datalist = h("datalist", { id: "partner-names" }, partners.map((p) => h("option", { value: p })));
  const choice = (name: string) => choices[name] ?? FALLBACK_CHOICES[name];
  const family = choiceSelect("model", choice("model"), FAMILY_NAMES);
  const strategy = choiceSelect("strategy", choice("strategy"), STRATEGY_NAMES);
  const partitioning = choiceSelect("partitioning", choice("partitioning"), PARTITION_NAMES);
  const deploy = choiceSelect("deploy", choice("deploy"), DEPLOY_NAMES);
  const rounds = numberInput("rounds", null, 1, 100);
  const epsilon = numberInput("epsilon", 3, 0.1, 100, 0.1);
  const localEpochs = numberInput("local_epochs", null, 1, 20);
  const batchSize = numberInput("batch_size", null, 0, 4096);
  const learningRate = numberInput("learning_rate", null, 0.000001, 100, 0.000001);
  const clipNorm = numberInput("clip_norm", 1, 0.01, 1000, 0.01);
  const personalize = numberInput("personalize_epochs", null, 0, 20);
  const maxTrain = h("input", { type: "number", name: "max_train_examples", min: 8, max: 100000, placeholder: "server default" });
  const maxTest = h("input", { type: "number", name: "max_test_examples", min: 8, max: 100000, placeholder: "server default" });
  const secure = h("input", { type: "checkbox", name: "secure_mode", checked: true });
  const familyConfig = h("textarea", { name: "model_config", rows: 2, placeholder: '{"hidden_dim": 64}', spellcheck: "false" });
  const submit = h("button", { type: "submit", class: "primary" }, "Start run");

  const form = h(
    "form",
    { class: "stack", "aria-label": "Start a run" },
    h(
      "div",
      { class: "grid" },
      field(
        "Participants",
        participants,
        `Other tenants, comma-separated. Each one's admin must first list “${tenant}” under Partners.`,
      ),
      datalist,
      field("Rounds", rounds, "Blank: the model family's default."),
      field("Epsilon (ε) for this run", epsilon, "Charged to every participant's privacy budget."),
      field("Model family", family, "Encoder + private head learns well under DP; the others train from scratch and need far more data."),
    ),
    h(
      "details",
      { class: "advanced" },
      h("summary", null, "Advanced settings"),
      h(
        "div",
        { class: "grid" },
        field("Strategy", strategy),
        field("Local epochs", localEpochs),
        field("Batch size", batchSize, "0 sizes it by each tenant's data, where the server supports it."),
        field("Learning rate", learningRate),
        field("Clipping norm", clipNorm),
        field("Personalization epochs", personalize),
        field("Partitioning", partitioning, "Simulated federations only."),
        field("Max training examples", maxTrain, "Per tenant; simulated federations only."),
        field("Max test examples", maxTest, "Per tenant; simulated federations only."),
        field("Deploy new versions", deploy, "A decision is taken only when the released difference is larger than the noise."),
        field("Family settings (JSON)", familyConfig, "Optional, e.g. layer sizes."),
        h("div", { class: "field checkbox" }, h("label", null, secure, " Secure mode (cryptographic noise source)")),
      ),
    ),
    notice.el,
    h("div", { class: "actions" }, submit),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    void busy(submit, notice, async () => {
      const body: Record<string, unknown> = {
        participants: participants.value.split(",").map((s) => s.trim()).filter(Boolean),
        epsilon: epsilon.valueAsNumber,
        model: family.value,
        strategy: strategy.value,
        clip_norm: clipNorm.valueAsNumber,
        deploy: deploy.value,
        secure_mode: secure.checked,
      };
      // Left blank: not sent, so the family's (or the server's) default applies.
      for (const input of [rounds, localEpochs, batchSize, learningRate, personalize, maxTrain, maxTest]) {
        if (input.value !== "") body[input.name] = input.valueAsNumber;
      }
      if (partitioning.value) body.partitioning = partitioning.value;
      if (familyConfig.value.trim()) {
        try {
          body.model_config = JSON.parse(familyConfig.value);
        } catch {
          throw new Error("Family settings must be a JSON object, e.g. {\"hidden_dim\": 64}.");
        }
      }
      submit.textContent = "Starting…";
      onStarted(await api.startRun(body));
    });
  });
  return form;
}

function runsTable(runs: Run[]): HTMLElement {
  if (!runs.length) return emptyState("No runs yet. Start one below.");
  return table(
    "Training runs",
    ["Run", "Status", "Participants", "Rounds done", "Accuracy", "Macro-F1", "Started"],
    runs.map((run) => {
      // The released figures of the version the run stored (the same as on Models); older
      // servers: the last evaluated round.
      const r = run.result;
      const last = lastEvaluation(run);
      return [
        h("a", { href: `#/runs/${encodeURIComponent(run.id)}`, class: "mono" }, shortId(run.id)),
        statusBadge(run.status),
        run.participants.join(", "),
        progress(run),
        r ? withUncertainty(r.accuracy, r.accuracy_sd, r.accuracy_low, r.accuracy_high) : withUncertainty(last?.accuracy, last?.accuracy_sd),
        r ? withUncertainty(r.macro_f1, r.macro_f1_sd, r.macro_f1_low, r.macro_f1_high) : withUncertainty(last?.macro_f1, last?.macro_f1_sd),
        fmtTime(run.created_at),
      ];
    }),
    { cards: true },
  );
}

export const runsPage: Page = (main, ctx) => {
  const notice = new Notice();
  const listSlot = h("div", null, loading());
  const live = h("p", { class: "muted live", "aria-live": "polite" });
  const formSlot = h("div", null);
  main.append(
    pageHeader("Runs", "Federated training runs your tenant started. Each round is charged to every participant's privacy budget when it is dispatched."),
    card("Runs", notice.el, live, listSlot),
    card("Start a run", formSlot),
  );
  let timer: number | undefined;
  let stopped = false;

  async function refresh(): Promise<void> {
    try {
      const runs = await api.runs();
      if (stopped) return;
      notice.clear();
      listSlot.replaceChildren(runsTable(runs));
      const active = runs.some((r) => ACTIVE.has(r.status));
      live.textContent = active ? "A run is in progress: this list refreshes every few seconds." : "";
      if (active) timer = window.setTimeout(refresh, LIST_REFRESH_MS);
    } catch (err) {
      if (!stopped) notice.error(err);
    }
  }

  void (async () => {
    // Suggestions and choices only: the form still works without them.
    const [partners, choices] = await Promise.all([
      api.partners().then((p) => p.tenants, () => [] as string[]),
      runChoices().catch(() => ({}) as Record<string, Choices>),
    ]);
    if (stopped) return;
    formSlot.replaceChildren(startForm(ctx.tenant, partners, choices, (run) => ctx.navigate(`#/runs/${encodeURIComponent(run.id)}`)));
  })();
  void refresh();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
  };
};

function series(metrics: RoundMetric[], rounds: number): RoundSeries {
  const last = Math.max(rounds, ...metrics.map((m) => m.round), 0);
  const numbers = Array.from({ length: last }, (_, i) => i + 1);
  const pick = (phase: string, key: "accuracy" | "macro_f1") =>
    numbers.map((r) => {
      const m = metrics.find((x) => x.round === r && x.phase === phase);
      return m ? (m[key] ?? null) : null;
    });
  return {
    rounds: numbers,
    accuracy: pick("evaluate", "accuracy"),
    macroF1: pick("evaluate", "macro_f1"),
    trainAccuracy: pick("train", "accuracy"),
  };
}

function facts(run: Run, unit: string | null): HTMLElement {
  const row = (term: string, value: Node | string) => [h("dt", null, term), h("dd", null, value)];
  return h(
    "dl",
    { class: "facts" },
    row("Status", statusBadge(run.status)),
    row("Participants", run.participants.join(", ")),
    // What one epsilon protects, as charged on your ledger (known from the first charge).
    row("Privacy unit", unit ?? "— (nothing charged to your tenant yet)"),
    row("Rounds done", progress(run)),
    row("Started", fmtTime(run.created_at)),
    row("Finished", fmtTime(run.finished_at)),
    row("Last heartbeat", fmtTime(run.heartbeat_at)),
    row("Run id", h("span", { class: "mono wrap" }, run.id)),
  );
}

export const runPage: Page = (main, _ctx, [id]) => {
  const notice = new Notice();
  const header = pageHeader(`Run ${shortId(id)}`, undefined, h("a", { href: "#/runs", class: "button ghost" }, "← All runs"));
  const factsSlot = h("div", null, loading());
  const errorSlot = h("div", null);
  const actionSlot = h("div", { class: "actions" });
  const live = h("p", { class: "muted live", "aria-live": "polite" });
  const { box, canvas } = chartBox("Held-out accuracy and macro-F1 per round");
  const chartCard = card("Accuracy and macro-F1 per evaluated round", box);
  chartCard.hidden = true; // only once two or more rounds were evaluated: one dot is no chart
  const progressSlot = h("div", null);
  const releasedSlot = h("div", null);
  const metricsSlot = h("div", null);
  main.append(
    header,
    notice.el,
    h("div", { class: "columns" }, card("Overview", factsSlot, errorSlot, actionSlot), card("Progress", live, progressSlot)),
    card("Released final metrics", releasedSlot),
    chartCard,
    card("Released figures per round", h("p", { class: "muted" }, "Your tenant's own figures; the other participants' are theirs to read. No metric leaves a node while it trains: held-out figures are released once, noised and charged, when the run ends."), metricsSlot),
  );
  let chart: RoundsChart | null = null;
  let timer: number | undefined;
  let stopped = false;
  let confirming = false;
  let unit: string | null = null;
  let askingUnit = false;

  function renderActions(run: Run): void {
    if (!ACTIVE.has(run.status) && run.status !== "interrupted") {
      actionSlot.replaceChildren();
      return;
    }
    if (confirming) return;
    const cancel = h("button", { type: "button", class: "danger" }, "Cancel run");
    cancel.addEventListener("click", () => {
      confirming = true;
      const yes = h("button", { type: "button", class: "danger" }, "Yes, cancel it");
      const no = h("button", { type: "button", class: "ghost" }, "Keep running");
      no.addEventListener("click", () => {
        confirming = false;
        renderActions(run);
      });
      yes.addEventListener("click", () =>
        busy(yes, notice, async () => {
          const updated = await api.cancelRun(id);
          confirming = false;
          show(updated);
        }),
      );
      actionSlot.replaceChildren(h("span", null, "Rounds already dispatched stay charged. "), yes, no);
      yes.focus();
    });
    actionSlot.replaceChildren(cancel);
  }

  function show(run: Run): void {
    factsSlot.replaceChildren(facts(run, unit));
    if (unit === null && !askingUnit) {
      askingUnit = true;
      void api
        .ledger()
        .then(
          (entries) => {
            unit = runUnit(entries, run.id);
            if (!stopped && unit !== null) factsSlot.replaceChildren(facts(run, unit));
          },
          () => undefined, // the unit stays unknown; the run's own figures still show
        )
        .finally(() => (askingUnit = false));
    }
    errorSlot.replaceChildren(run.error ? h("p", { class: "notice notice-warn" }, run.error) : "");
    renderActions(run);
    const evaluated = run.metrics.filter((m) => m.phase === "evaluate" && m.accuracy !== null).length;
    chartCard.hidden = evaluated < 2;
    if (!chartCard.hidden) {
      const s = series(run.metrics, run.rounds);
      if (chart) updateRoundsChart(chart, s);
      else chart = roundsChart(canvas, s);
    }
    const done = Math.min(run.checkpoint_round, run.rounds);
    const trained = new Set(run.metrics.filter((m) => m.phase === "train").map((m) => m.round)).size;
    live.textContent = ACTIVE.has(run.status)
      ? `Live: ${done} of ${run.rounds} rounds done; refreshing every ${RUN_REFRESH_MS / 1000} s.`
      : `${done} of ${run.rounds} rounds done.`;
    progressSlot.replaceChildren(
      h("progress", { class: "rounds", max: Math.max(run.rounds, 1), value: done, "aria-label": `${done} of ${run.rounds} rounds done` }),
      h("p", { class: "muted" }, `${trained} round(s) in which your tenant's update was accepted.`),
    );
    releasedSlot.replaceChildren(
      run.result
        ? releasedFigures(run.result)
        : emptyState(
            run.status === "completed"
              ? "This run released no held-out figures for your tenant (its evaluation noise was 0, or too few test rows)."
              : "Released once, when the run ends: accuracy and macro-F1 on your held-out rows, each with its uncertainty.",
          ),
    );
    const released = run.metrics.filter((m) => m.accuracy !== null || m.macro_f1 !== null || m.loss !== null);
    metricsSlot.replaceChildren(
      released.length
        ? table(
            "Released figures per round",
            ["Round", "Phase", "Examples", "Loss", "Accuracy", "Macro-F1"],
            released.map((m) => [
              String(m.round),
              m.phase,
              String(m.examples),
              fmtNum(m.loss),
              withUncertainty(m.accuracy, m.accuracy_sd),
              withUncertainty(m.macro_f1, m.macro_f1_sd),
            ]),
          )
        : emptyState(run.metrics.length ? "Nothing released yet: the figures come when the run ends." : "No round has reported yet."),
    );
  }

  async function refresh(): Promise<void> {
    try {
      const run = await api.run(id);
      if (stopped) return;
      notice.clear();
      show(run);
      if (ACTIVE.has(run.status)) timer = window.setTimeout(refresh, RUN_REFRESH_MS);
    } catch (err) {
      if (stopped) return;
      notice.error(err);
      // A passing outage (no answer, 5xx, 429): keep following; a 404 or 403 is final.
      const status = err instanceof ApiError ? err.status : 0;
      if (status === 0 || status === 429 || status >= 500) timer = window.setTimeout(refresh, RUN_REFRESH_MS * 2);
    }
  }

  void refresh();
  return () => {
    stopped = true;
    window.clearTimeout(timer);
    chart?.destroy();
  };
};
