"""Errors that are the user's to fix: reported as one line, with a non-zero exit."""


class UserError(Exception):
  """Bad input (config, data, checkpoint). The message names the problem and the fix."""
