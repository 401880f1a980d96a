"""Training a retrieval head: recipes, cached examples, the accelerate trainer, the probe and the main job."""

from retrieval_head.training.recipe import Recipe, RecipeError, RecipeMismatchError, check_resumable, diff_recipes
from retrieval_head.training.setup import TeacherDimError
from retrieval_head.training.trainer import Trainer, TrainingStopped, TrainResult, train

__all__ = [
    "Recipe",
    "RecipeError",
    "RecipeMismatchError",
    "TeacherDimError",
    "TrainResult",
    "Trainer",
    "TrainingStopped",
    "check_resumable",
    "diff_recipes",
    "train",
]
