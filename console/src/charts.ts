// Chart.js, registered with only the pieces the console draws (tree-shaken by Vite).
import {
  ArcElement,
  CategoryScale,
  Chart,
  DoughnutController,
  Filler,
  Legend,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
  type ChartDataset,
} from "chart.js";
import { h } from "./dom";

Chart.register(
  ArcElement,
  CategoryScale,
  DoughnutController,
  Filler,
  Legend,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
);

const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
Chart.defaults.animation = reducedMotion ? false : { duration: 250 };
Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
Chart.defaults.color = "#3b4250";
Chart.defaults.maintainAspectRatio = false;

export const COLORS = {
  blue: "#1f6feb",
  teal: "#0d8a79",
  orange: "#c4680f",
  red: "#c0392b",
  grey: "#9aa3b2",
  light: "#e4e8ef",
};

/** A canvas in a sized box (Chart.js fills its parent), described for screen readers. */
export function chartBox(label: string, extraClass = ""): { box: HTMLElement; canvas: HTMLCanvasElement } {
  const canvas = h("canvas", { role: "img", "aria-label": label });
  return { box: h("div", { class: `chart ${extraClass}`.trim() }, canvas), canvas };
}

export interface RoundSeries {
  rounds: number[];
  accuracy: (number | null)[];
  macroF1: (number | null)[];
  trainAccuracy: (number | null)[];
}

type RoundsChart = Chart<"line", (number | null)[], string>;

export function roundsChart(canvas: HTMLCanvasElement, series: RoundSeries): RoundsChart {
  const datasets: ChartDataset<"line", (number | null)[]>[] = [
    {
      label: "Accuracy (held-out)",
      data: series.accuracy,
      borderColor: COLORS.blue,
      backgroundColor: COLORS.blue,
      tension: 0.2,
    },
    {
      label: "Macro-F1 (held-out)",
      data: series.macroF1,
      borderColor: COLORS.teal,
      backgroundColor: COLORS.teal,
      tension: 0.2,
    },
    {
      label: "Accuracy (training)",
      data: series.trainAccuracy,
      borderColor: COLORS.grey,
      backgroundColor: COLORS.grey,
      borderDash: [5, 4],
      tension: 0.2,
    },
  ];
  return new Chart<"line", (number | null)[], string>(canvas, {
    type: "line",
    data: { labels: series.rounds.map((r) => `Round ${r}`), datasets },
    options: {
      spanGaps: true,
      interaction: { mode: "index", intersect: false },
      scales: {
        // Points sit in the middle of their round, so a run's first round is not on the edge.
        x: { offset: true },
        y: { min: 0, max: 1, title: { display: true, text: "score" } },
      },
      plugins: {
        legend: {
          position: "bottom",
          // A series the API reports nothing for (e.g. training accuracy) stays out of the key.
          labels: {
            boxWidth: 12,
            filter: (item, data) =>
              (data.datasets[item.datasetIndex ?? 0]?.data ?? []).some((v) => v !== null),
          },
        },
      },
    },
  });
}

export function updateRoundsChart(chart: RoundsChart, series: RoundSeries): void {
  chart.data.labels = series.rounds.map((r) => `Round ${r}`);
  chart.data.datasets[0].data = series.accuracy;
  chart.data.datasets[1].data = series.macroF1;
  chart.data.datasets[2].data = series.trainAccuracy;
  chart.update();
}

/** A half doughnut: spent, reserved (when the API reports it) and remaining epsilon. */
export function budgetGauge(
  canvas: HTMLCanvasElement,
  parts: { spent: number; reserved: number; remaining: number },
): Chart<"doughnut"> {
  const labels = ["Spent", "Reserved", "Remaining"];
  const data = [parts.spent, parts.reserved, parts.remaining];
  const colors = [COLORS.orange, "#e7b36a", COLORS.light];
  const keep = data.map((_, i) => i !== 1 || parts.reserved > 0);
  return new Chart(canvas, {
    type: "doughnut",
    data: {
      labels: labels.filter((_, i) => keep[i]),
      datasets: [
        {
          data: data.filter((_, i) => keep[i]),
          backgroundColor: colors.filter((_, i) => keep[i]),
          borderWidth: 0,
        },
      ],
    },
    options: {
      rotation: -90,
      circumference: 180,
      cutout: "68%",
      plugins: {
        legend: { display: false },
        tooltip: {
          callbacks: { label: (item) => ` ${item.label}: ε ${Number(item.raw).toFixed(3)}` },
        },
      },
    },
  });
}

export interface EpsilonPoint {
  t: number;
  epsilon: number;
  label: string;
}

/**
 * Cumulative epsilon after each charged round, in ledger order. The x axis is the sequence
 * of charges labelled with their time: rounds come in bursts (a run charges its rounds
 * minutes apart, then nothing for weeks), which a linear time axis would squash into spikes.
 */
export function epsilonChart(
  canvas: HTMLCanvasElement,
  points: EpsilonPoint[],
  budget: number,
): Chart<"line", number[], string> {
  const dateOf = (t: number) =>
    new Date(t).toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  return new Chart<"line", number[], string>(canvas, {
    type: "line",
    data: {
      labels: points.map((p) => dateOf(p.t)),
      datasets: [
        {
          label: "Cumulative ε (PRV)",
          data: points.map((p) => p.epsilon),
          borderColor: COLORS.orange,
          backgroundColor: "rgba(196, 104, 15, 0.12)",
          fill: true,
          stepped: "before",
          pointRadius: 3,
        },
        {
          label: `Budget (ε ${budget})`,
          data: points.map(() => budget),
          borderColor: COLORS.red,
          borderDash: [6, 4],
          pointRadius: 0,
          pointHitRadius: 0,
          borderWidth: 1.5,
        },
      ],
    },
    options: {
      interaction: { mode: "index", intersect: false },
      scales: {
        x: { ticks: { maxTicksLimit: 6, maxRotation: 0, autoSkip: true } },
        y: { beginAtZero: true, suggestedMax: budget, title: { display: true, text: "ε" } },
      },
      plugins: {
        legend: { position: "bottom", labels: { boxWidth: 12 } },
        tooltip: {
          filter: (item) => item.datasetIndex === 0,
          callbacks: {
            label: (item) => ` ε ${Number(item.raw).toFixed(3)} after ${points[item.dataIndex]?.label ?? ""}`,
          },
        },
      },
    },
  });
}

export type { Chart, RoundsChart };
