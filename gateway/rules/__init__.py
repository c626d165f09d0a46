"""Business rules: the rule-set document, conditions, segments, the compiled book and applying it, triggers."""
