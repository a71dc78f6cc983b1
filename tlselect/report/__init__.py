"""The report step of the DAG: the tables, the answer in words and the figures, from registry records
only (no torch)."""
