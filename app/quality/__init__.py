"""Quality verdicts: labelled sets, the evaluation and its statistics, shadow queries and drift, the HTML report."""
