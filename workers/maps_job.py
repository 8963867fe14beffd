"""One attention-map figure in a child process of the API (which imports no torch): a JSON request on
stdin, the PNG on stdout; a request the client can fix exits 2 with {"loc", "msg"} (JSON) as the last
line of stderr."""

from __future__ import annotations

import base64
import json
import sys
import warnings
from pathlib import Path
from typing import Any

CLIENT_ERROR = 2  # exit status: the message on stderr is for the client (a 4xx)


class RequestError(ValueError):
    """Something the client sent that cannot be drawn, and where: ("body",) for the image,
    ("query", "modules") or ("query", "sample")."""

    def __init__(self, loc: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def draw(request: dict[str, Any]) -> bytes:
    """The figure `request` asks for: {"storage", "study", "trial", "weights", "sample", "modules",
    "image" (base64, optional), "title"}; the study's trial gives the spec and the dataset."""
    import optuna
    from safetensors.torch import load_file

    from search_spaces.storage import open_storage
    from search_spaces.study import study_config
    from spsa_nas import build_model
    from spsa_nas.attention_maps import ImageError, attention_map_png, load_image, validation_image
    from spsa_nas.spec import ArchSpec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(request["storage"])
    try:
        study = optuna.load_study(study_name=request["study"], storage=storage)
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == request["trial"])
        spec = ArchSpec.model_validate(trial.user_attrs["spec"])
        # the artifact file has no suffix; trial weights are always stored as safetensors
        model = build_model(spec, weights=load_file(request["weights"], device="cpu"))
        title = request.get("title", "")
        if request.get("image") is not None:
            try:
                image = load_image(base64.b64decode(request["image"]), in_channels=spec.in_channels,
                                   size=spec.input_size)
            except ImageError as exc:
                raise RequestError(("body",), str(exc)) from None
        else:
            cfg = study_config(study)
            sample = request["sample"]
            try:
                image = validation_image(cfg.dataset, spec, sample)
            except IndexError as exc:
                raise RequestError(("query", "sample"), str(exc.args[0])) from None
            title += f" on {cfg.dataset.name} validation image {sample}"
        try:
            return attention_map_png(model, image, request.get("modules") or None, title=title)
        except ValueError as exc:  # a module name that matches none, a model without SPSA
            raise RequestError(("query", "modules"), str(exc)) from None
    finally:
        storage.close()


ATTENTION_MAP_ATTR = "spsa_nas:attention_map"  # study user attr: {"trial", "artifact_id", "sample"}


def attach_best_map(study: Any, artifact_store: Any, *, sample: int = 0) -> dict[str, Any] | None:
    """The figure of the best trial's SPSA modules on validation image `sample`, stored as an
    artifact of the study (optuna-dashboard lists it on the study's page; a finished trial cannot
    take new artifacts) and named in the study's user attr ATTENTION_MAP_ATTR. None when there is
    no best trial with weights, or its model has no SPSA."""
    import tempfile

    import optuna
    from optuna.artifacts import download_artifact, upload_artifact
    from safetensors.torch import load_file

    from search_spaces.keys import WEIGHTS_ARTIFACT_ATTR
    from search_spaces.study import select_best, study_config
    from spsa_nas import build_model
    from spsa_nas.attention_maps import attention_map_png, spsa_modules, validation_image
    from spsa_nas.spec import ArchSpec

    try:
        trial = select_best(study)
    except LookupError:
        return None
    artifact_id = trial.user_attrs.get(WEIGHTS_ARTIFACT_ATTR)
    spec_data = trial.user_attrs.get("spec")
    if not artifact_id or spec_data is None:
        return None
    spec = ArchSpec.model_validate(spec_data)
    if getattr(spec, "task", "classification") != "classification":
        return None  # a detector's backbone maps need the detector's input pipeline: not drawn here
    with tempfile.TemporaryDirectory() as workdir:
        weights = Path(workdir) / "weights.safetensors"
        download_artifact(artifact_store=artifact_store, file_path=str(weights), artifact_id=artifact_id)
        model = build_model(spec, weights=load_file(str(weights), device="cpu"))
        if not spsa_modules(model):
            return None
        cfg = study_config(study)
        try:
            image = validation_image(cfg.dataset, spec, sample)
        except IndexError:  # a small validation split: its first image
            sample = 0
            image = validation_image(cfg.dataset, spec, sample)
        title = f"{study.study_name}, trial {trial.number} on {cfg.dataset.name} validation image {sample}"
        figure = Path(workdir) / f"attention-map-trial{trial.number}.png"
        figure.write_bytes(attention_map_png(model, image, title=title))
        with warnings.catch_warnings():  # optuna marks artifacts experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            stored = upload_artifact(artifact_store=artifact_store, file_path=str(figure),
                                     study_or_trial=study, mimetype="image/png")
    record = {"trial": trial.number, "artifact_id": stored, "sample": sample}
    study.set_user_attr(ATTENTION_MAP_ATTR, record)
    return record


def main() -> int:
    try:
        request = json.loads(sys.stdin.read())
        png = draw(request)
    except RequestError as exc:  # the last line of stderr, for the API to answer 422 with
        print(json.dumps({"loc": list(exc.loc), "msg": str(exc)}), file=sys.stderr)
        return CLIENT_ERROR
    sys.stdout.buffer.write(png)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
