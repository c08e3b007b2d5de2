"""Task distributions. Each benchmark declares its TaskSpec and samples TaskBatches with an explicit generator."""
