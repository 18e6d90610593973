"""The error types that mean "the user must change something": the CLI prints them as one line."""
from normquant.data.text import DataError
from normquant.export import ExportError
from normquant.models.arch import UnsupportedArchitecture
from normquant.models.fold import FoldError
from normquant.models.loading import ModelLoadError
from normquant.pipeline.step import StepError
from normquant.quant.primitives import QuantError
from normquant.recipe import RecipeError

USER_ERRORS = (RecipeError, StepError, ModelLoadError, DataError, QuantError, UnsupportedArchitecture, ExportError,
               FoldError, FileExistsError)
