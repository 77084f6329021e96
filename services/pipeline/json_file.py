"""Reading a JSON configuration file a setting names.

Contract: `read_json_file(path, variable, error)` returns the parsed document;
a file that cannot be read or is not JSON raises `error` with a one-line reason
naming the setting (never the file's contents).
"""

from __future__ import annotations

from typing import Any

import orjson


def read_json_file(path: str, variable: str, error: type[Exception]) -> Any:
    """The JSON document at `path` (named by setting `variable`), or `error` saying why not."""
    try:
        with open(path, "rb") as fh:
            return orjson.loads(fh.read())
    except OSError as exc:
        raise error(f"{variable} cannot be read ({exc.strerror})") from None
    except orjson.JSONDecodeError as exc:
        raise error(f"{variable} is not valid JSON ({exc})") from None
