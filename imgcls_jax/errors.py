"""The one exception type for mistakes a user can fix (bad config, missing data, bad checkpoint)."""


class UserError(Exception):
  """A problem the user caused and can fix; its message is one sentence naming the fix.

  ``main`` prints it as a single line and exits with status 2 instead of a traceback.
  """
  # Raised inside code tf.data traces (a preprocessing op checking its input's static shape),
  # TensorFlow's AutoGraph passes it on as it is instead of wrapping it in an "in user code:" trace.
  ag_pass_through = True
