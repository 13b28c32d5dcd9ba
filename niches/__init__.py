"""The search: genomes over a recipe's free numbers, CMA-ES, and the M2N2 natural-niches loop."""
