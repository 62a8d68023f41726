"""The default defense, one module per step (moving here from probe_plan.py, step by step)."""
