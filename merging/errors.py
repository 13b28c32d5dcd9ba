"""The errors a user can cause. The CLI prints their message and exits non-zero.

Each message names what is at fault (the model, the tensor, the recipe line) so a user
can fix the input without reading a traceback.
"""


class EvomergeError(Exception):
    """Bad input: the message says what to fix."""


class RecipeError(EvomergeError):
    """A recipe that cannot be parsed or does not describe a valid merge."""


class CheckpointError(EvomergeError):
    """A model folder, Hub id or tensor file that cannot be used."""


class RecipeNote(UserWarning):
    """Something in a recipe that mergekit accepts and evomerge follows, but that a user
    may not mean (a key given twice, a key mergekit ignores). The CLI prints it as a note."""
