"""Push a verified export to the Hugging Face Hub: create the repo, upload the folder, README.md as the card.

    finetune export runs/tiny-moe/dpo --output exports/tiny-moe-instruct --push-to-hub my-org/tiny-moe-instruct [--private]

Sits in export/ (imports only errors and, inside functions, huggingface_hub). The CLI calls
`check_push` before the export starts (a bad repo id or a missing token fails in a second, not
after the merge) and `push_export` only after the export is verified and swapped into place, so
what goes up is exactly the directory the export wrote and checked: shards, index, config,
tokenizer, generation config, export.json and the model card (README.md, which the hub shows as
the model page). A failed upload changes nothing on disk; the message says how to retry
without exporting again. Not run against the hub from this project's machines (no network
there); tested up to the transport in tests/unit/export/test_export_push.py.
"""

from __future__ import annotations

import re
from pathlib import Path

from finetune.errors import CheckFailed, UserError

# The hub's own rule (huggingface_hub.utils.validate_repo_id) also allows a bare NAME; a push needs the
# namespace so the repo lands where the user means, not under whatever account the token belongs to.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    """repo_id if it is ORG/NAME as the hub accepts it, else a UserError saying what is wrong."""
    # imported here, not at the top: keeps `finetune --help` and `validate` fast
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # (as above)

    problem = None
    if not REPO_ID.match(repo_id):
        problem = "expected ORG/NAME (letters, digits, '-', '_', '.'; each part at most 96 characters)"
    else:
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            problem = str(err).splitlines()[0]
    if problem:
        raise UserError(f"--push-to-hub {repo_id!r}: {problem}; e.g. --push-to-hub my-org/tiny-moe-instruct")
    return repo_id


def hub_token() -> str:
    """The token huggingface_hub would use (HF_TOKEN, or the one `hf auth login` stored), else a UserError."""
    from huggingface_hub import get_token  # only with --push-to-hub

    token = get_token()
    if not token:
        raise UserError("--push-to-hub needs a Hugging Face token with write access: run `hf auth login` "
                        "or set HF_TOKEN, then run the export again")
    return token


def check_push(repo_id: str) -> str:
    """Everything a push needs that can be checked without the network; returns the token."""
    check_repo_id(repo_id)
    return hub_token()


def export_files(directory: Path) -> list[str]:
    """Every file of the export, relative to it, sorted: what the upload must carry."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def push_export(directory: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create `repo_id` (a model repo; kept if it exists) and upload the export directory to it in one
    commit. Returns the repo URL. The local export is only read."""
    from huggingface_hub import HfApi  # only with --push-to-hub

    directory = Path(directory)
    check_repo_id(repo_id)
    token = token or hub_token()
    if not (directory / "export.json").is_file() or not (directory / "README.md").is_file():
        raise UserError(f"{directory}: not a finished export (no export.json or README.md); run `finetune export` first")
    files = export_files(directory)
    api = HfApi(token=token)
    retry = f"the export at {directory} is intact; retry with `hf upload {repo_id} {directory} .`"
    try:
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model",
                          allow_patterns=files,  # exactly the export's files, even if something is added meanwhile
                          commit_message=f"Upload {directory.name} (finetune export, {len(files)} files)")
    except OSError as err:  # HfHubHTTPError is an OSError; so are connection errors and timeouts
        raise CheckFailed(f"push to the hub repo {repo_id} failed: {type(err).__name__}: {err}; {retry}") from None
    return str(url)
