"""Reports and gates: report.json, Markdown, HTML, JUnit, and the gate verdicts."""
