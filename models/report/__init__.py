"""The dtype report: fidelity and speed of each precision against float32, its probe prompts and chart."""
