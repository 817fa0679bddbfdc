"""The one exception type for mistakes a user can fix (bad config, missing data, bad checkpoint),
and the one way an underlying exception is quoted inside such a message (``first_line``)."""


class UserError(Exception):
  """A problem the user caused and can fix; its message is one sentence naming the fix.

  ``main`` prints it as a single line and exits with status 2 instead of a traceback.
  """
  # Raised inside code tf.data traces (a preprocessing op checking its input's static shape),
  # TensorFlow's AutoGraph passes it on as it is instead of wrapping it in an "in user code:" trace.
  ag_pass_through = True


def first_line(err: BaseException, limit: int = 160) -> str:
  """``Type: first line of the message``, cut at a word past ``limit`` characters (`` ...``);
  ``Type`` alone when the message is empty."""
  text = str(err).strip().splitlines()[0] if str(err).strip() else ''
  if len(text) > limit:
    text = text[:limit].rsplit(' ', 1)[0] + ' ...'
  return f'{type(err).__name__}: {text}' if text else type(err).__name__
