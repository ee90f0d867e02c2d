"""CSV -> validated entries -> rendered audio -> published cache version (never imports ``gateway``)."""

from cache_seed.route_lines import route_lines
from cache_seed.seed import (PUBLISHING, NewAnswerLimit, ProgressCallback, RenderError,
                            Renderer, SeedCancelled, SeedProgress, SeedReport,
                            TooManyNewAnswers, render_answers, seed, seed_plan)
from cache_seed.validate import (RowError, SeedError, SeedPlan, SeedValidationError,
                                 parse_seed_csv, parse_seed_rows, parse_target_wrong_rate,
                                 read_seed_csv, rows_from_manifest)

__all__ = ["PUBLISHING", "NewAnswerLimit", "ProgressCallback", "RenderError", "Renderer",
           "RowError", "SeedCancelled", "SeedError", "SeedPlan", "SeedProgress", "SeedReport",
           "SeedValidationError", "TooManyNewAnswers",
           "parse_seed_csv", "parse_seed_rows", "parse_target_wrong_rate", "read_seed_csv",
           "render_answers", "route_lines", "rows_from_manifest", "seed", "seed_plan"]
