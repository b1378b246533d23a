"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class JaxftError(Exception):
  """A user-facing error: bad config, missing file, unresolvable asset, bad checkpoint."""
