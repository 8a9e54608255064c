"""``w2wkit demo``: the whole method, end to end, in a few minutes on a CPU.

With the shipped miniature world (:func:`run_demo`):

1. fit the identity space on the world's LoRAs and fit attribute directions;
2. sample 4 new identities and render them at several seeds;
3. edit one training model along 2 directions (each, then both);
4. invert 1 held-out picture (or ``--image``) into a model;
5. write ``report.html`` (a first screen of a sample, the best edit and the
   inversion with captions; grids, metrics, explained-variance plot) and the
   LoRA files made on the way.

Without a shipped world (:func:`run_synthetic_demo`): a real run on a
*planted* collection of SD1.5-layout LoRA files (:mod:`w2wkit.synthetic`):
fit, directions (with disentanglement), a calibrated edit, sampling,
export, and a report with plots - no images, and the output says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from w2wkit.errors import FormatError, W2WError
from w2wkit.render import resolve_device
from w2wkit.report import report_folder
from w2wkit.stio import write_json

__all__ = ["DemoSettings", "run_demo", "run_synthetic_demo"]


@dataclass
class DemoSettings:
    """Settings of :func:`run_demo` (defaults fit 5 minutes on a 2-core CPU).

    Attributes
    ----------
    n_components : int
        Components of the identity space (capped at N-1; 200 hold 81% of the
        variance of the shipped world's 1,100 identities).
    n_samples, seeds : int
        Sampled identities and renders of each.
    directions : tuple of str
        The two edit directions.
    strength : float
        Edit strength (training standard deviations) of a direction that cannot
        be calibrated (each direction's calibrated strength otherwise).
    inversion_components, inversion_steps, inversion_lr : int, int, float or None
        Inversion recipe; ``None``: the defaults of ``w2wkit invert``
        (:func:`w2wkit.invert.default_settings`).
    render_steps, guidance : rendering.
    seed : int
    device : str
    threads : int
        torch threads on the CPU (1: more threads on a small, busy CPU are
        many times slower).
    """

    n_components: int = 200
    n_samples: int = 4
    seeds: int = 4
    directions: tuple[str, str] = ("beard", "glasses")
    strength: float = 2.0
    inversion_components: int | None = None
    inversion_steps: int | None = None
    inversion_lr: float | None = None
    render_steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    device: str = "auto"
    threads: int = 1


# --------------------------------------------------------------------------- helpers


def _check_mask_file(path: Any, sizes: list[tuple[int, int]]) -> None:
    """A mask file must have the picture's own size or the pipeline's (one line otherwise)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise FormatError("mask not found", path=path) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise FormatError(f"cannot read the mask ({type(exc).__name__})", path=path) from None
    if (h, w) not in sizes:
        want = " or ".join(f"{b}x{a}" for a, b in dict.fromkeys(sizes))
        raise FormatError(
            f"mask is {w}x{h}, need {want} (the picture's size or the pipeline's)", path=path
        )


def _inv_progress(ev: Any, desc: str) -> Any:
    """A callback for :func:`w2wkit.invert.invert` driving the run's progress bar."""
    cb = ev.task(desc, 1)

    def update(step: int, steps: int, loss: float) -> None:
        cb(step, steps)

    return update


def _repoint(space: Any, stage: Path, final: Path) -> None:
    """The space's record of its training files: under ``final``, where they will be."""
    for entry in space.manifest_:
        f = entry.get("file")
        if isinstance(f, str) and Path(f).is_relative_to(stage):
            entry["file"] = str(final / Path(f).relative_to(stage))


def _say(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None:
        log(text)


def _explained_variance_plot(space: Any, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evr = np.asarray(space.explained_variance_ratio_, dtype=np.float64)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(evr) + 1), np.cumsum(evr), marker="." if len(evr) < 40 else None)
    ax.set_xlabel("components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tiles(pictures: Any, path: Path, cols: int = 2, px: int = 160) -> None:
    """Save pictures as one large grid for the report's first screen.

    Parameters
    ----------
    pictures : array of shape (n, H, W, 3)
        Floats in [0, 1].
    path : Path
        The PNG written.
    cols : int
        Pictures per row.
    px : int
        Each picture is enlarged (nearest neighbour, an integer factor) to at least
        this many pixels wide.
    """
    from PIL import Image

    u8 = (np.clip(np.asarray(pictures, dtype=np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    n, h, w, _ = u8.shape
    f = max(1, -(-px // w))
    u8 = np.repeat(np.repeat(u8, f, axis=1), f, axis=2)
    h, w, gap = h * f, w * f, 4
    rows = -(-n // cols)
    out = np.full((rows * h + gap * (rows - 1), cols * w + gap * (cols - 1), 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = u8[i]
    Image.fromarray(out).save(path)


def _calibrated(
    space: Any, names: Any, ev: Any, w: Any, s: DemoSettings, models: Any, step: Any
) -> dict[str, float]:
    """Each direction's calibrated strength (``s.strength`` where it cannot be calibrated)."""
    from w2wkit.calibrate import CalibrationSettings, calibrate_direction

    cs = CalibrationSettings(
        n_models=4,
        seeds=2,
        steps=s.render_steps,
        guidance=s.guidance,
        strengths=(1.0, 2.0, 3.0, 4.0, 6.0, 8.0),
        seed=s.seed,
        confirm=0,  # a demo: stop at the first strength whose lower bound reaches the target
    )
    out = {}
    for n in names:
        try:
            rec = calibrate_direction(
                space,
                n,
                ev.renderer,
                w.evaluators,
                pack=w.pack,
                settings=cs,
                models=models,
                prompt=ev.prompt,
            )
            out[n] = float(rec["strength"])
            step(f"      {n}: calibrated strength {out[n]:g} ({rec['success']:.0%} success)")
        except W2WError as exc:
            out[n] = float(s.strength)
            step(f"      {n}: uncalibrated ({exc.message}); strength {s.strength}")
    return out


def _first_screen(
    metrics: dict[str, Any],
    intra: list[float],
    best: dict[str, Any] | None,
    src: str,
    held: bool,
    n_seeds: int,
) -> str:
    """The report's first screen: a sample, the best edit and the inversion, with captions."""
    from w2wkit.report import panel

    figs = []
    one = f" Same-person score across them: {intra[0]:.2f} (1 = identical)." if intra else ""
    figs.append(
        (
            "images/first_sample.png",
            "A new person, sampled",
            "A model drawn at random from the space (not one of the training models), "
            f"drawn at {n_seeds} seeds (pose and light change, the person should not).{one}",
        )
    )
    if best is not None:
        d = best["direction"]
        prob = (
            f" The classifier's {d} probability: {best['p_before']:.2f} before, "
            f"{best['p_after']:.2f} after."
            if "p_after" in best
            else ""
        )
        figs.append(
            (
                "images/first_edit.png",
                f"An edit: {best['edit']}",
                f"Top row: training model {best['model']}; bottom row: the same model moved "
                f"{best['strength']:g} standard deviations along the {d} direction (2 seeds)."
                f"{prob} Same-person score to the original: {best['id_score']:.2f}.",
            )
        )
    inv = metrics["inversion"]
    score = (
        f" Same-person score to other pictures of that person: {inv['id_score']:.2f} "
        f"(two different people: {inv['id_score_other_identities']:.2f})."
        if held and inv.get("id_score") is not None
        else ""
    )
    figs.append(
        (
            "images/first_inversion.png",
            "An inversion: one picture in, a model out",
            f"Top left: the only input ({src}); the others: the model found for it, "
            f"drawn at new seeds.{score}",
        )
    )
    return panel(figs)


# --------------------------------------------------------------------------- world demo


def run_demo(
    out_dir: str | os.PathLike[str] = "w2w-demo",
    *,
    world: Any = None,
    settings: DemoSettings | None = None,
    image: str | os.PathLike[str] | None = None,
    mask: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo on a miniature world and write ``out_dir/report.html``.

    Parameters
    ----------
    out_dir : path
    world : EvalWorld, path or None
        ``None``: the shipped world.
    settings : DemoSettings, optional
    image, mask : path, optional
        Invert this picture instead of a held-out render (resized to the
        pipeline's size if needed, with a notice; see
        :func:`w2wkit.invert.load_images`) with this mask (white = fit;
        default: the concept's face mask).
    overwrite : bool
    log : callable
        Where progress lines go.

    Returns
    -------
    dict
        Metrics and paths (also ``out_dir/demo.json``).

    Notes
    -----
    ``out_dir`` is written as a whole, in a staging folder published once
    (:func:`w2wkit.report.report_folder`): an existing report (replaced only
    with ``overwrite``; an empty folder always) stays as it was until the
    new one is complete.
    """
    import torch

    from w2wkit import evaluation as E

    s = settings or DemoSettings()
    t_all = time.perf_counter()
    out = Path(out_dir)
    if image is not None:  # a picture that cannot be read is refused before the world loads
        from w2wkit.invert import open_image

        open_image(image)
    w = world if isinstance(world, E.EvalWorld) else E.load_eval_world(world)
    user_img = None
    if image is not None:
        from w2wkit.invert import load_images

        size = (w.image_size, w.image_size)
        user_img, _, orig = load_images(image, size, notice=lambda m: _say(log, f"note: {m}"))
        if mask is not None:
            _check_mask_file(mask, [tuple(orig[0]), size])
    elif mask is not None:
        raise W2WError("`mask` needs `image`")
    torch.manual_seed(s.seed)
    threads = torch.get_num_threads()
    if resolve_device(s.device) == "cpu" and s.threads:
        torch.set_num_threads(int(s.threads))
    try:
        # the whole folder is the output: written in a staging folder, published once
        with report_folder(out, overwrite=overwrite) as stage:
            (stage / "images").mkdir()
            (stage / "loras").mkdir()
            return _run_demo(w, s, stage, out, image, mask, user_img, log, progress, t_all)
    finally:
        torch.set_num_threads(threads)


def _run_demo(
    w: Any,
    s: DemoSettings,
    out: Path,
    final: Path,
    image: Any,
    mask: Any,
    user_img: Any,
    log: Callable[[str], None] | None,
    progress: bool,
    t_all: float,
) -> dict[str, Any]:
    from w2wkit import evaluation as E
    from w2wkit.formats import write_adapter
    from w2wkit.render import make_grid
    from w2wkit.report import table, write_html

    timings: dict[str, float] = {}
    es = E.EvalSettings(
        n_components=s.n_components,
        render_steps=s.render_steps,
        guidance=s.guidance,
        seeds=s.seeds,
        seed=s.seed,
        device=s.device,
        batch_size=32,
    )
    with E.progress_bar(progress) as bar:
        ev = E.EvalContext(w, es, out, bar)
        ev.images = {}

        def step(text: str) -> None:
            _say(log, text)

        # 1. the space
        t0 = time.perf_counter()
        step(f"[1/5] fitting the identity space on {len(w.zoo)} LoRAs")
        space = E.fit_space(w.zoo, w.zoo_names, s.n_components, w.labels)
        timings["fit"] = time.perf_counter() - t0
        _explained_variance_plot(
            space, out / "images" / "explained_variance.png", f"{len(w.zoo)} identity LoRAs"
        )
        space.save(out / "space")

        # 2. sampling
        t0 = time.perf_counter()
        step(f"[2/5] sampling {s.n_samples} new identities")
        coef = space.sample(s.n_samples, seed=s.seed)
        samples = space.inverse_transform(coef)
        for i, ad in enumerate(samples):
            write_adapter(ad, out / "loras" / f"sample_{i}.safetensors", format="diffusers")
        imgs = ev.render(samples, desc="rendering samples")
        emb = ev.embed(imgs[:, 0])
        intra = [
            float(E.id_matrix(e, e)[np.triu_indices(len(e), 1)].mean()) for e in emb if len(e) > 1
        ]
        inter = [
            E.id_score(emb[a], emb[b]) for a in range(len(emb)) for b in range(a + 1, len(emb))
        ]
        near = space.nearest(coef, n=1)
        make_grid(
            imgs[:, 0],
            [f"sample {i}" for i in range(len(samples))],
            [f"seed {j}" for j in range(s.seeds)],
        ).save(out / "images" / "samples.png")
        _tiles(imgs[0, 0][:4], out / "images" / "first_sample.png")
        timings["sample"] = time.perf_counter() - t0

        # 3. editing one model along two directions
        t0 = time.perf_counter()
        dirs = [d for d in s.directions if d in space.directions_]
        dirs += [d for d in space.directions_ if d not in dirs][: max(0, 2 - len(dirs))]
        edit_rows: list[list[Any]] = []
        edit_best: dict[str, Any] | None = None
        st: dict[str, float] = {}
        if len(dirs) >= 2:
            a, b = dirs[:2]
            from w2wkit.formats import read_adapter

            def zoo_model(i: int) -> Any:
                m = w.zoo[int(i)]
                return read_adapter(m) if isinstance(m, (str, os.PathLike)) else m

            # visible strengths: calibrated with the world's classifier (w2wkit.calibrate)
            st = _calibrated(space, (a, b), ev, w, s, zoo_model, step)
            # a training model lacking both attributes, for which the pack finds both plausible
            row = 0
            for i in range(len(w.zoo)):
                attrs = {x: bool(v[i]) for x, v in w.labels.items() if np.isfinite(v[i])}
                plausible = getattr(w.pack, "plausible", lambda _a, _n: True)
                if all(w.labels.get(x, np.zeros(len(w.zoo)))[i] == 0 for x in (a, b)) and all(
                    plausible(attrs, x) for x in (a, b)
                ):
                    row = i
                    break
            base_ad = zoo_model(row)
            step(f"[3/5] editing {w.zoo_names[row]} along {a} ({st[a]:g}) and {b} ({st[b]:g})")
            edits = {
                f"+{a}": space.edit(base_ad, {a: st[a]}),
                f"+{b}": space.edit(base_ad, {b: st[b]}),
                f"+{a} +{b}": space.edit(base_ad, {a: st[a], b: st[b]}),
            }
            for name, ad in edits.items():
                stem = name.replace("+", "").replace(" ", "_")
                write_adapter(ad, out / "loras" / f"edit_{stem}.safetensors", format="diffusers")
            ed_imgs = ev.render([base_ad, *edits.values()], desc="rendering edits")
            make_grid(
                ed_imgs[:, 0], ["original", *edits], [f"seed {j}" for j in range(s.seeds)]
            ).save(out / "images" / "edits.png")
            attrs = list(w.evaluators.attributes)
            e0 = ev.embed(ed_imgs[0, 0])
            p0 = w.evaluators.attribute_probs(E.to_uint8(ed_imgs[0, 0]))
            for k, name in enumerate(edits, start=1):
                e = ev.embed(ed_imgs[k, 0])
                p = w.evaluators.attribute_probs(E.to_uint8(ed_imgs[k, 0]))
                idv = float(np.sum(E.unit(e) * E.unit(e0), axis=1).mean())
                cells = [name, idv]
                for x in (a, b):
                    j = attrs.index(x) if x in attrs else None
                    cells.append(
                        None if j is None else f"{p0[:, j].mean():.2f} -> {p[:, j].mean():.2f}"
                    )
                edit_rows.append(cells)
                # the best single-direction edit leads the report: one the classifier accepts
                # (p >= 0.5 after) that keeps the person most; else the largest gain
                x = name[1:]
                if x in attrs:
                    j = attrs.index(x)
                    gain = float(p[:, j].mean() - p0[:, j].mean())
                    rank = (float(p[:, j].mean()) >= 0.5, idv if p[:, j].mean() >= 0.5 else gain)
                    if edit_best is None or rank > edit_best["rank"]:
                        edit_best = {
                            "edit": name,
                            "direction": x,
                            "strength": st[x],
                            "model": w.zoo_names[row],
                            "p_before": float(p0[:, j].mean()),
                            "p_after": float(p[:, j].mean()),
                            "gain": gain,
                            "rank": rank,
                            "id_score": idv,
                            "k": k,
                        }
            if edit_best is None:  # no classifier output for either: show the first edit
                edit_best = {"edit": f"+{a}", "direction": a, "strength": st[a], "k": 1}
                edit_best.update(model=w.zoo_names[row], id_score=edit_rows[0][1])
            kb = edit_best["k"]
            _tiles(
                np.concatenate([ed_imgs[0, 0, :2], ed_imgs[kb, 0, :2]]),
                out / "images" / "first_edit.png",
            )
        else:
            step("[3/5] skipped editing: the world has fewer than 2 labelled attributes")
        timings["edit"] = time.perf_counter() - t0

        # 4. inversion of one held-out picture (or the user's)
        from w2wkit.invert import invert

        t0 = time.perf_counter()
        inst = w.heldout[0]
        if image is not None:
            img = E.to_uint8(user_img)
            src = Path(image).name
            inv_input: Any = str(image)
            inv_mask: Any = str(mask) if mask is not None else w.pack.mask(img)
        else:
            img = ev.real(inst, 1, seed=s.seed + 5)
            src = f"held-out identity {inst.index}"
            inv_input, inv_mask = img, w.pack.mask(img)
        step(f"[4/5] inverting one picture ({src})")
        inv = invert(
            space,
            ev.renderer.pipe,
            inv_input,
            n_components=s.inversion_components,
            steps=s.inversion_steps,
            lr=s.inversion_lr,
            mask=inv_mask,
            concept=w.pack,
            prompt=w.instance_prompt,
            device=ev.renderer.device,
            seed=s.seed,
            progress=_inv_progress(ev, "inversion"),
            notice=lambda m: None,
        )
        inv_ad = inv.adapters[0]
        write_adapter(inv_ad, out / "loras" / "inverted.safetensors", format="diffusers")
        inv_imgs = ev.render([inv_ad], desc="rendering the inverted model")
        first = np.concatenate([img / 255.0, inv_imgs[0, 0][:3]])
        _tiles(first, out / "images" / "first_inversion.png")
        cells = np.concatenate([img / 255.0, inv_imgs[0, 0]])[None]
        make_grid(cells, ["inverted"], ["input"] + [f"seed {j}" for j in range(s.seeds)]).save(
            out / "images" / "inversion.png"
        )
        inv_id = None
        ref_id = None
        if image is None:
            refs = ev.embed(ev.real(inst, 6, seed=s.seed + 99))
            inv_id = E.id_score(ev.embed(inv_imgs[0, 0]), refs)
            others = np.concatenate(
                [ev.embed(ev.real(h, 2, seed=s.seed + 99)) for h in w.heldout[1:6]] or [refs]
            )
            ref_id = E.id_score(refs, others)
        losses = inv.losses[0][np.isfinite(inv.losses[0])]
        q = max(1, len(losses) // 10)
        k = int(inv.settings["n_components"])
        timings["invert"] = time.perf_counter() - t0

    # 5. report
    _say(log, "[5/5] writing the report")
    evr = np.cumsum(space.explained_variance_ratio_)
    metrics = {
        "world": w.name,
        "n_models": len(w.zoo),
        "n_components": int(space.n_components_),
        "explained_variance_first_10": float(evr[min(9, len(evr) - 1)]),
        "samples": {
            "intra_model_id": E.summarize(intra),
            "inter_model_id": E.summarize(inter),
            "nearest_training": [[r[0][1], r[0][2]] for r in near],
        },
        "edits": {
            "directions": dirs[:2],
            "strength": s.strength,
            "strengths": st,
            "calibration": {
                d: space.directions_[d].info.get("calibration") for d in dirs[:2] if edit_rows
            },
            "rows": edit_rows,
        },
        "inversion": {
            "source": src,
            "components": k,
            "steps": int(inv.steps_run[0]),
            "recipe": {k_: inv.settings[k_] for k_ in ("n_components", "lr", "steps")},
            "loss_first_last": [float(losses[:q].mean()), float(losses[-q:].mean())],
            "id_score": inv_id,
            "id_score_other_identities": ref_id,
            "seconds": float(inv.seconds),
        },
        "seconds": {**timings, "total": time.perf_counter() - t_all},
        "settings": asdict(s),
    }
    if edit_best is not None:
        edit_best.pop("rank", None)
    metrics["first_screen"] = {"edit": edit_best}
    parts = [
        "<p class=note>At a glance: a new model, an edit and an inversion. Details below.</p>",
        _first_screen(metrics, intra, edit_best, src, image is None, min(4, s.seeds)),
        f"<p>World: <b>{w.name}</b>, {len(w.zoo)} identity LoRAs; space of "
        f"{space.n_components_} components ({evr[min(9, len(evr) - 1)]:.1%} of the variance in "
        f"the first 10). Evaluators: {getattr(w.evaluators, 'name', '')}. Total "
        f"{metrics['seconds']['total']:.0f} s.</p>",
        "<h2>The space</h2><p><img src='images/explained_variance.png'></p>",
        "<h2>Sampled identities</h2><p class=note>Rows: new models drawn from the space; "
        "columns: seeds (pose, light). A consistent identity per row is the claim.</p>",
        table(
            ["intra-model ID (across seeds)", "inter-model ID", "nearest training model (cosine)"],
            [
                [
                    metrics["samples"]["intra_model_id"],
                    metrics["samples"]["inter_model_id"],
                    ", ".join(f"{n} ({c:.2f})" for n, c in metrics["samples"]["nearest_training"]),
                ]
            ],
        ),
        "<p><img src='images/samples.png'></p>",
    ]
    if edit_rows:
        parts += [
            "<h2>Edits</h2><p class=note>Strengths "
            + ", ".join(f"{d} {v:g}" for d, v in st.items())
            + " training standard deviations: each direction's calibrated strength (the smallest "
            "at which the classifier sees the attribute on >= 80% of zoo models lacking it; "
            f"{s.strength} where it could not be calibrated), on a model lacking both for which "
            "the concept pack finds both plausible; ID score to the original's renders (same "
            "seeds); attribute probability (classifier) before -> after.</p>",
            table(["edit", "ID to original", *[f"p({d})" for d in dirs[:2]]], edit_rows),
            "<p><img src='images/edits.png'></p>",
        ]
    parts += [
        f"<h2>Inversion</h2><p class=note>{src}: {k} coefficients optimised for "
        f"{metrics['inversion']['steps']} steps ({metrics['inversion']['seconds']:.1f} s); loss "
        f"{metrics['inversion']['loss_first_last'][0]:.4f} -> "
        f"{metrics['inversion']['loss_first_last'][1]:.4f}.</p>",
        table(
            ["ID to other renders of the identity", "ID between different identities (chance)"],
            [[inv_id, ref_id]],
        ),
        "<p><img src='images/inversion.png'></p>",
        "<p class=note>LoRA files written: <code>loras/</code>; "
        "the space: <code>space/</code>.</p>",
    ]
    write_html(out / "report.html", "w2wkit demo", "\n".join(parts))
    metrics["report"] = str(final / "report.html")
    write_json(out / "demo.json", metrics, strict=True)
    return metrics


# --------------------------------------------------------------------------- synthetic demo


def run_synthetic_demo(
    out_dir: str | os.PathLike[str] = "w2w-demo",
    *,
    n_models: int = 150,
    seed: int = 0,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
    progress: bool = True,
) -> dict[str, Any]:
    """The demo without a miniature world: a planted collection of real LoRA files.

    Writes ``n_models`` rank-1 SD1.5-layout kohya LoRAs near a planted
    subspace with planted attributes, fits a space, fits directions (beard
    disentangled from male), edits a model with calibrated strengths (and
    checks the calibration), samples and exports models, and writes a
    report with plots. No images: nothing here renders.

    Returns
    -------
    dict
        Metrics and paths (also ``out_dir/demo.json``).

    Notes
    -----
    ``out_dir`` is written as a whole, like :func:`run_demo`'s.
    """
    t_all = time.perf_counter()
    out = Path(out_dir)
    with report_folder(out, overwrite=overwrite) as stage:
        return _run_synthetic_demo(stage, out, n_models, seed, log, progress, t_all)


def _run_synthetic_demo(
    out: Path,
    final: Path,
    n_models: int,
    seed: int,
    log: Callable[[str], None] | None,
    progress: bool,
    t_all: float,
) -> dict[str, Any]:
    """:func:`run_synthetic_demo` into the staging folder ``out`` (published as ``final``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from w2wkit.directions import cosine_matrix, fit_directions
    from w2wkit.formats import read_adapter, write_adapter
    from w2wkit.report import table, write_html
    from w2wkit.space import WeightSpace
    from w2wkit.synthetic import planted_collection

    (out / "images").mkdir()
    (out / "exported").mkdir()
    _say(log, f"[1/5] writing a planted collection of {n_models} SD1.5-layout LoRA files")
    t0 = time.perf_counter()
    planted = planted_collection(out / "loras", n_models, seed=seed, progress=progress)
    t_write = time.perf_counter() - t0
    _say(log, "[2/5] fitting the space")
    t0 = time.perf_counter()
    space = WeightSpace(n_components=min(40, n_models - 1), random_state=seed)
    space.fit(out / "loras", labels=planted.labels_path, progress=progress)
    t_fit = time.perf_counter() - t0
    _say(log, "[3/5] fitting directions (beard kept orthogonal to male)")
    fit_directions(space, disentangle={"beard": ["male"]})
    names = list(space.directions_)
    vecs = [np.asarray(space.directions_[n].vector) for n in names]
    cos = cosine_matrix(vecs)
    _say(log, "[4/5] editing, sampling, exporting")
    model = read_adapter(planted.files[0])
    strengths = {"old": 1.5, "glasses": -1.0}
    edited = space.edit(model, strengths)
    c0 = space.transform(model)[0]
    moved = {}
    for name, st in strengths.items():
        # each direction alone: its projection moves by exactly `st` training stds
        c1 = space.transform(space.edit(model, {name: st}))[0]
        d = space.directions_[name]
        moved[name] = float((c1 - c0) @ np.asarray(d.vector, dtype=np.float64) / d.proj_std)
    write_adapter(edited, out / "exported" / "edited.safetensors", format="kohya")
    coef = space.sample(4, seed=seed)
    for i, ad in enumerate(space.inverse_transform(coef)):
        write_adapter(ad, out / "exported" / f"sample_{i}.safetensors", format="kohya")
    near = space.nearest(coef, n=1)
    _repoint(space, out, final)
    space.save(out / "space")
    _say(log, "[5/5] writing the report")
    _explained_variance_plot(space, out / "images" / "explained_variance.png", "planted collection")
    fig, ax = plt.subplots(figsize=(4, 3.4))
    im = ax.imshow(np.abs(cos), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(names)), names)
    ax.set_title("|cos| between directions")
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(out / "images" / "direction_cosines.png", dpi=100)
    plt.close(fig)
    evr = np.cumsum(space.explained_variance_ratio_)
    metrics = {
        "world": "synthetic (no shipped miniature world)",
        "n_models": n_models,
        "n_components": int(space.n_components_),
        "explained_variance_first_24": float(evr[min(23, len(evr) - 1)]),
        "directions": {n: float(space.directions_[n].score or float("nan")) for n in names},
        "direction_cosines": cos.tolist(),
        "edit": {"strengths": strengths, "moved_std": moved},
        "samples_nearest": [[r[0][1], r[0][2]] for r in near],
        "seconds": {"write": t_write, "fit": t_fit, "total": time.perf_counter() - t_all},
    }
    parts = [
        "<p><b>No miniature world is shipped in this checkout</b>, so this demo ran on a planted "
        f"collection: {n_models} real rank-1 LoRA files in the SD1.5 <code>to_q/to_v</code> layout "
        "(99,648 numbers each) near a 24-dimensional subspace, with binary attributes linear in "
        "planted directions (beard correlated with male). Nothing is rendered.</p>",
        "<h2>The space</h2>",
        table(
            ["models", "components", "variance in 24 components", "fit seconds"],
            [[n_models, space.n_components_, metrics["explained_variance_first_24"], t_fit]],
        ),
        "<p><img src='images/explained_variance.png'></p>",
        "<h2>Directions</h2>",
        table(
            ["direction", "cross-validated accuracy"],
            [[n, v] for n, v in metrics["directions"].items()],
        ),
        "<p><img src='images/direction_cosines.png'></p>",
        "<h2>Calibrated edit</h2><p class=note>Strength s moves the model's projection on the "
        "direction by s training standard deviations.</p>",
        table(
            ["direction", "strength", "measured move (std)"],
            [[n, strengths[n], moved[n]] for n in strengths],
        ),
        "<h2>Samples</h2>",
        table(
            ["sample", "nearest training model", "cosine"],
            [[i, n, c] for i, (n, c) in enumerate(metrics["samples_nearest"])],
        ),
        "<p class=note>Files: <code>exported/</code> (kohya), the space: <code>space/</code>.</p>",
    ]
    write_html(out / "report.html", "w2wkit demo (synthetic)", "\n".join(parts))
    metrics["report"] = str(final / "report.html")
    write_json(out / "demo.json", metrics, strict=True)
    return metrics
