"""SecAPI test suite."""
