"""DP parameters, accountants, the privacy ledger and budgets."""
