"""The one exception type for mistakes a user can fix (bad config, missing data, bad checkpoint)."""


class UserError(Exception):
  """A problem the user caused and can fix; its message is one sentence naming the fix.

  ``main`` prints it as a single line and exits with status 2 instead of a traceback.
  """
