// The /v1 API, as the console uses it. Every call carries the admin key in the
// Authorization header; the key lives in this tab's sessionStorage only.

const STORAGE_KEY = "fedtext.console.key";

export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = "ApiError";
  }
}

export interface Budget {
  tenant: string;
  budget_epsilon: number;
  delta: number;
  spent_epsilon: number;
  spent_epsilon_rdp: number;
  remaining_epsilon: number;
  accountant: string;
  events: number;
  dataset_budgets?: Record<string, number>;
  // Newer servers: epsilon held by active runs for planned, not yet charged releases;
  // remaining_epsilon then already excludes it.
  reserved_epsilon?: number | null;
  reserved_releases?: number | null;
}

export interface RoundMetric {
  round: number;
  phase: string;
  examples: number;
  // Null where nothing is released for the phase (e.g. training rounds).
  loss: number | null;
  accuracy: number | null;
  macro_f1: number | null;
  // Newer servers, on the final phase's rows: the SD from the known noise and test size.
  accuracy_sd?: number | null;
  macro_f1_sd?: number | null;
}

/** A version's released held-out figures with their uncertainty (the same on Runs and Models). */
export interface ReleasedMetrics {
  model: string; // "global" or "personalized"
  accuracy: number | null;
  accuracy_sd: number | null;
  accuracy_low: number | null;
  accuracy_high: number | null;
  macro_f1: number | null;
  macro_f1_sd: number | null;
  macro_f1_low: number | null;
  macro_f1_high: number | null;
  test_examples: number | null;
  test_examples_sd: number | null;
  confidence: number | null;
  uncertainty_warning: string | null;
  model_choice: string | null;
  deploy_reason: string | null;
  version?: number | null;
}

export interface Run {
  id: string;
  status: string;
  participants: string[];
  rounds: number;
  checkpoint_round: number;
  error: string | null;
  created_at: string;
  finished_at: string | null;
  heartbeat_at: string | null;
  metrics: RoundMetric[];
  // Newer servers: the released final figures (null until the run completes).
  result?: ReleasedMetrics | null;
}

export interface ModelSummary {
  name: string;
  versions: number;
  deployed_version: number | null;
}

export interface ModelVersion {
  name: string;
  version: number;
  deployed: boolean;
  created_at: string;
  run_id: string | null;
  size_bytes: number;
  spec: Record<string, unknown>;
  metrics: Record<string, unknown>;
  released?: ReleasedMetrics | null;
}

export interface Prediction {
  model: string;
  version: number;
  predictions: { label: string; score: number }[][];
}

export interface Key {
  id: string;
  name: string;
  prefix: string;
  scopes: string[];
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
}

export interface LedgerEntry {
  dataset: string;
  purpose?: string;
  seq: number;
  run_id: string;
  round: number;
  created_at: string;
  mechanism: string;
  noise_multiplier: number;
  sample_rate: number;
  steps: number;
  clip_norm: number;
  delta: number;
  accountant: string;
  prev_hash: string;
  entry_hash: string;
  // "example" or "user"; k of a user-level entry is in applied_json (max_examples_per_user).
  privacy_unit?: string;
  applied_json?: string;
}

export interface ReportRound {
  seq: number;
  run_id: string;
  round: number;
  created_at: string;
  cumulative_epsilon: number | null;
  cumulative_epsilon_rdp: number | null;
}

export interface Report {
  tenant: string;
  budget_epsilon: number;
  spent_epsilon: number;
  chain_ok: boolean;
  chain: {
    ledger_ok: boolean;
    ledger_entries: number;
    ledger_problem: string | null;
    ledger_head: string;
    budget_chain_ok: boolean;
    budget_changes: number;
    budget_problem: string | null;
    budget_head: string;
    budget_matches_tenant: boolean;
    // Newer servers: the check against the newest head the platform signed.
    checked_head_at?: string | null;
    head_problems?: string[];
  };
  independent?: { library: string; epsilon: number; agrees: boolean };
  rounds: ReportRound[];
}

export function storedKey(): string | null {
  return sessionStorage.getItem(STORAGE_KEY);
}

export function storeKey(key: string | null): void {
  if (key === null) sessionStorage.removeItem(STORAGE_KEY);
  else sessionStorage.setItem(STORAGE_KEY, key);
}

/** The public prefix of an ftk_<prefix>_<secret> key (what GET /v1/keys lists). */
export function keyPrefix(key: string | null): string | null {
  const parts = (key ?? "").split("_");
  return parts.length >= 3 ? parts[1] : null;
}

/** The API's own message: a string detail, or FastAPI's validation list joined. */
function messageOf(status: number, body: unknown): string {
  const detail = (body as { detail?: unknown } | null)?.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d: { loc?: unknown[]; msg?: string }) => {
        const where = (d.loc ?? []).filter((p) => p !== "body").join(".");
        return where ? `${where}: ${d.msg ?? ""}` : (d.msg ?? "");
      })
      .join("; ");
  }
  return `The server answered ${status}.`;
}

let onUnauthorized: () => void = () => {};

export function setUnauthorizedHandler(handler: () => void): void {
  onUnauthorized = handler;
}

async function send(method: string, path: string, body?: unknown, key = storedKey()): Promise<Response> {
  const headers: Record<string, string> = { Accept: "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response: Response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "The server could not be reached.");
  }
  if (!response.ok) {
    let parsed: unknown = null;
    try {
      parsed = await response.json();
    } catch {
      /* not JSON: a proxy's page */
    }
    if (response.status === 401 && key === storedKey()) onUnauthorized();
    throw new ApiError(response.status, messageOf(response.status, parsed));
  }
  return response;
}

async function json<T>(method: string, path: string, body?: unknown, key?: string): Promise<T> {
  const response = await send(method, path, body, key);
  return (await response.json()) as T;
}

export const api = {
  /** Checks a key before it is stored: an admin key of a live tenant answers. */
  signIn: (key: string) => json<Budget>("GET", "/v1/privacy/budget", undefined, key),
  budget: () => json<Budget>("GET", "/v1/privacy/budget"),
  ledger: () => json<LedgerEntry[]>("GET", "/v1/privacy/ledger"),
  report: () => json<Report>("GET", "/v1/privacy/report"),
  download: async (path: string) => (await send("GET", path)).blob(),

  runs: () => json<Run[]>("GET", "/v1/runs"),
  run: (id: string) => json<Run>("GET", `/v1/runs/${encodeURIComponent(id)}`),
  startRun: (body: Record<string, unknown>) => json<Run>("POST", "/v1/runs", body),
  cancelRun: (id: string) => json<Run>("POST", `/v1/runs/${encodeURIComponent(id)}/cancel`),

  models: () => json<ModelSummary[]>("GET", "/v1/models"),
  versions: (name: string) =>
    json<ModelVersion[]>("GET", `/v1/models/${encodeURIComponent(name)}/versions`),
  deploy: (name: string, version: number) =>
    json<ModelVersion>(
      "POST",
      `/v1/models/${encodeURIComponent(name)}/versions/${version}/deploy`,
    ),
  rollback: (name: string) =>
    json<ModelVersion>("POST", `/v1/models/${encodeURIComponent(name)}/rollback`),
  predict: (name: string, text: string, topK: number) =>
    json<Prediction>("POST", `/v1/models/${encodeURIComponent(name)}/predict`, {
      inputs: [text],
      top_k: topK,
    }),

  keys: () => json<Key[]>("GET", "/v1/keys"),
  createKey: (body: { name: string; scopes: string[]; expires_at?: string }) =>
    json<{ key: Key; secret: string }>("POST", "/v1/keys", body),
  revokeKey: (id: string) => json<Key>("DELETE", `/v1/keys/${encodeURIComponent(id)}`),

  partners: () => json<{ tenants: string[] }>("GET", "/v1/partners"),
  setPartners: (tenants: string[]) => json<{ tenants: string[] }>("PUT", "/v1/partners", { tenants }),
};

export interface Choices {
  options: string[];
  default: string | null;
}

type OpenApi = {
  paths?: Record<string, unknown>;
  components?: { schemas?: Record<string, { properties?: Record<string, Record<string, unknown>> }> };
};

let openapi: Promise<OpenApi> | null = null;

/** The server's own schema (public, fetched once): what this server's API offers. */
function schema(): Promise<OpenApi> {
  openapi ??= fetch("/openapi.json", { credentials: "omit" }).then(
    (r) => (r.ok ? (r.json() as Promise<OpenApi>) : {}),
    () => ({}),
  );
  return openapi;
}

/** Whether this server has a route (newer servers gain some; the console adapts). */
export async function hasPath(path: string): Promise<boolean> {
  return path in ((await schema()).paths ?? {});
}

/** Enumerated run settings as the server's own schema states them (it may gain families). */
export async function runChoices(): Promise<Record<string, Choices>> {
  const props = (await schema()).components?.schemas?.RunCreate?.properties ?? {};
  const out: Record<string, Choices> = {};
  for (const [name, prop] of Object.entries(props)) {
    const variants = [prop, ...((prop.anyOf as Record<string, unknown>[] | undefined) ?? [])];
    const values = variants.flatMap((v) => (Array.isArray(v.enum) ? (v.enum as string[]) : []));
    if (values.length) out[name] = { options: values, default: (prop.default as string | undefined) ?? null };
  }
  return out;
}
