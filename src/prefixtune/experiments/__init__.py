"""The paper's tables and figures as grids of runs at a chosen scale, with their reports."""
