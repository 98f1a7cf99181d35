"""Errors that are the user's to fix: reported as one line, with a non-zero exit."""


import sys


class UserError(Exception):
  """Bad input (config, data, checkpoint). The message names the problem and the fix."""


def run_cli(parser, action) -> int:
  """Parses argv with `parser`, runs `action(args)` and prints its result; a UserError is one line
  on stderr and exit status 2 (as in every jembed command)."""
  def main(argv=None) -> int:
    try:
      args = parser.parse_args(argv)
    except SystemExit as e:
      return int(e.code or 0)
    try:
      out = action(args)
    except UserError as e:
      print(f"jembed: error: {e}", file=sys.stderr)
      return 2
    if out:
      print(out)
    return 0
  return main
