// The privacy unit of a ledger entry, as a person reads it: what one epsilon protects.

import type { LedgerEntry } from "./api";

/** "per user (k = 8)" for a privacy-unit user entry (k: each user's row bound, from the
 * entry's applied settings), "per example" otherwise (older servers name no unit). */
export function unitLabel(e: LedgerEntry): string {
  if (e.privacy_unit !== "user") return "per example";
  let k: unknown;
  try {
    k = (JSON.parse(e.applied_json ?? "{}") as Record<string, unknown>).max_examples_per_user;
  } catch {
    k = undefined;
  }
  return typeof k === "number" ? `per user (k = ${k})` : "per user";
}

/** The unit of a run's entries: one label, or both joined when they differ. */
export function runUnit(entries: LedgerEntry[], runId: string): string | null {
  const labels = [...new Set(entries.filter((e) => e.run_id === runId).map(unitLabel))];
  return labels.length ? labels.join(", ") : null;
}
