"""CSV -> validated entries -> rendered audio -> published cache version (never imports ``gateway``)."""

from cache_seed.route_lines import route_lines
from cache_seed.seed import RenderError, Renderer, SeedReport, render_answers, seed
from cache_seed.validate import (RowError, SeedError, SeedPlan, SeedValidationError,
                                 parse_seed_csv, read_seed_csv)

__all__ = ["RenderError", "Renderer", "RowError", "SeedError", "SeedPlan", "SeedReport",
           "SeedValidationError", "parse_seed_csv", "read_seed_csv", "render_answers",
           "route_lines", "seed"]
