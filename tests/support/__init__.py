"""Test infrastructure shared by the suites: CRD schema, merge patch, polling."""
