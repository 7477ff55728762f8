"""`python -m parakeet_core FILE...`: transcribe local files in-process."""

from __future__ import annotations

import argparse
import json
import sys

from . import DEFAULT_CHECKPOINT, ParakeetError, from_pretrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parakeet_core", description=__doc__)
    parser.add_argument("files", nargs="+", help="audio files (anything soundfile reads, else ffmpeg)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="local .nemo file or Hugging Face repo id")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--timestamps", action="store_true", help="add word and segment timestamps")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    args = parser.parse_args(argv)
    try:
        model = from_pretrained(args.checkpoint, device=args.device)
        transcripts = model.transcribe(list(args.files), batch_size=args.batch_size, timestamps=args.timestamps)
    except ParakeetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path, transcript in zip(args.files, transcripts):
        if args.json:
            record = {"file": path, "text": transcript.text}
            if args.timestamps:
                record.update(transcript.timestamps_dict())
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"{path}\t{transcript.text}")
            for word in transcript.words or []:
                print(f"  {word.start:8.2f} {word.end:8.2f}  {word.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
