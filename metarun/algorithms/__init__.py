"""Meta-learning algorithms: each is one file behind the MetaAlgorithm protocol plus one YAML file."""
