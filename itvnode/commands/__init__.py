

import argparse as _argparse


class DefaultsHelpFormatter(_argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows the defaults that are values; an unset option (``None``, ``[]``) says what its help
    text says (usually "default: setting ...") instead of "(default: None)"."""

    def _get_help_string(self, action: _argparse.Action) -> str | None:
        if action.default is None or action.default == []:
            return action.help
        return super()._get_help_string(action)
