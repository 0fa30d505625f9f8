"""The augmentation study: the arms and their budgets (arms, design), the statistics (stats, auroc),
the comparison table (compare), power planning (power) and the cost estimate (cost)."""
