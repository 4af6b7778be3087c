"""`tfgan-ct pacs`: upscale the CT series of a PACS over DICOMweb and store the results beside them."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from tfgan_ct.cli.options import AUTO_TILE_OPTION, TILE_PAD_OPTION, config_options
from tfgan_ct.stages import CT_MODALITIES


def _date(ctx, param, value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected a date as YYYY-MM-DD, got {value!r}") from None


@click.command()
@click.option("--dicomweb", "url", required=True, metavar="URL",
              help="DICOMweb root of the PACS, e.g. http://localhost:8042/dicom-web (no credentials in it).")
@click.option("--models-dir", default="saved_models", show_default=True, type=click.Path(file_okay=False),
              help="Exports to use: the newest of each stage, chosen by the series' modality.")
@click.option("--model", "spec", default=None, metavar="STAGE[@N]|PATH",
              help="One export for every series instead of one per modality.")
@click.option("--server", default=None, metavar="URL",
              help="TensorFlow Serving serving the stages by name: grpc://HOST:8500 or http://HOST:8501.")
@click.option("--once/--watch", default=True, show_default=True,
              help="Process what is there and exit, or keep watching until SIGINT/SIGTERM.")
@click.option("--interval", type=click.FloatRange(min=1), default=30, show_default=True,
              help="--watch: seconds between searches.")
@click.option("--settle", type=click.FloatRange(min=0), default=30, show_default=True,
              help="Seconds a series' instance count must stay unchanged before it is processed.")
@click.option("--modality", type=click.Choice(["auto", *CT_MODALITIES]), default="auto", show_default=True,
              help="Modality of every series, or decided from the headers as `convert --modality auto`.")
@click.option("--since", callback=_date, default=None, metavar="YYYY-MM-DD",
              help="Only studies dated on or after this day.")
@click.option("--token-env", default=None, metavar="VAR", help="Environment variable holding a bearer token.")
@click.option("--user-env", default=None, metavar="VAR", help="Environment variable holding the user name.")
@click.option("--password-env", default=None, metavar="VAR", help="Environment variable holding the password.")
@click.option("--ca-bundle", default=None, type=click.Path(exists=True, dir_okay=False),
              help="CA certificates to verify the server with (default: the system's).")
@click.option("--insecure", is_flag=True, help="Do not verify the server's TLS certificate (not for production).")
@click.option("--orthanc-rest", default=None, metavar="URL",
              help="Orthanc's REST root, to delete a partly stored series (its DICOMweb has no DELETE).")
@click.option("--uncertainty", is_flag=True,
              help="Also store a flip-spread series (HU) showing where the model is unsure (8x the inference).")
@click.option("--dry-run", is_flag=True, help="List what would be done; retrieve and store nothing.")
@click.option("--out", default="pacs-work", show_default=True, type=click.Path(file_okay=False),
              help="Folder for pacs.log, pacs_report.json and the temporary images of the series in work.")
@AUTO_TILE_OPTION
@TILE_PAD_OPTION
@click.option("--timeout", type=click.FloatRange(min=1), default=60, show_default=True,
              help="Seconds per DICOMweb request.")
@config_options
def pacs(url, models_dir, spec, server, once, interval, settle, modality, since, token_env, user_env,
         password_env, ca_bundle, insecure, orthanc_rest, uncertainty, dry_run, out, tile, tile_pad, timeout, cfg):
    """Upscale the CT series of a PACS and store each derived series in the same study.

    Finds CT series over QIDO-RS, leaves out those that already have a derived
    series from tfgan-ct (read from the PACS, so reruns and parallel instances
    make no duplicates), waits until a series stops growing, retrieves it over
    WADO-RS, upscales it with the model of its modality and stores the result
    with STOW-RS. Each derived image carries its trust figures in
    ImageComments; pacs_report.json in --out holds them per series.
    Credentials come only from the environment variables named.
    """
    from tfgan_ct.deploy.pacs.dicomweb import Credentials, DicomWebPacs
    from tfgan_ct.deploy.pacs.models import Models
    from tfgan_ct.deploy.pacs.worker import LOG, PacsOptions, PacsWorker
    from tfgan_ct.logs import log_to_file

    verify = False if insecure else (ca_bundle or True)
    client = DicomWebPacs(url, Credentials(token_env, user_env, password_env), verify=verify, timeout=timeout,
                          orthanc_rest=orthanc_rest)
    options = PacsOptions(modality=modality, since=since, settle=settle, interval=interval,
                          uncertainty=uncertainty, dry_run=dry_run, tile=tile, tile_pad=tile_pad)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with log_to_file(out / LOG):
        worker = PacsWorker(client, Models(Path(models_dir), spec, server), cfg, options, out)
        counts = worker.run(watch=not once)
    done = ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "nothing to do"
    click.echo(f"pacs {url}: {done}" + ("" if dry_run else f"; report: {out / 'pacs_report.json'}"))
    if counts["failed"] and once:
        raise click.ClickException(f"{counts['failed']} series failed (the reasons are in {out / LOG})")
