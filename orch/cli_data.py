"""``orch data prepare``: tokenize documents into a token file (:mod:`orch.prepare_data`)."""

from __future__ import annotations

import argparse


def add_data_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="tokenize documents into a token file training reads",
        description="Training data from documents, before any run.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    prepare = actions.add_parser(
        "prepare", help="text and JSON-lines files to a .bin of token ids",
        description="Tokenize text files (each one document; .gz read transparently) and "
        "JSON-lines files (.jsonl: one object per line, its --key field a document) with a "
        "HuggingFace tokenizer or orch's byte tokenizer, each document followed by the "
        "end-of-document id, into NAME.bin (uint16 ids for vocabularies up to 65,536, else "
        "int32) with Megatron's index NAME.idx beside it (the ids' type and where documents "
        "start), for data.path here and --data-path NAME in Megatron. Nothing is written until "
        "every argument checks out, and the files appear only once complete.")
    prepare.add_argument("inputs", nargs="+", metavar="INPUT", help="text or .jsonl files")
    prepare.add_argument("--tokenizer", required=True, metavar="TOKENIZER",
                         help="'byte', a tokenizer.json, or a HuggingFace model directory "
                         "holding one (e.g. the model.init_from directory)")
    prepare.add_argument("--out", required=True, metavar="OUT.bin",
                         help="the token file (OUT.idx is written beside it)")
    prepare.add_argument("--key", default="text",
                         help="the documents' field in JSON-lines files (default: text)")
    eos = prepare.add_mutually_exclusive_group()
    eos.add_argument("--eos", metavar="TOKEN", help="the end-of-document token (default: the "
                     "eos_token of the tokenizer_config.json beside tokenizer.json; with "
                     "--tokenizer byte a byte value, e.g. 0)")
    eos.add_argument("--no-eos", action="store_true",
                     help="append nothing between documents")
    prepare.add_argument("--force", action="store_true",
                         help="replace OUT and its .idx if they exist (once the new files are "
                         "complete)")
    prepare.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from orch.prepare_data import prepare

    done = prepare(args.inputs, args.tokenizer, args.out, key=args.key, eos=args.eos,
                   no_eos=args.no_eos, force=args.force)
    print(f"wrote {done.out}: {done.tokens:,} tokens of {done.documents:,} "
          f"document{'s' if done.documents != 1 else ''} "
          f"({done.dtype}, vocabulary {done.vocab_size:,})")
    if args.force and (cache := done.out.with_suffix("") / "cache").is_dir():
        print(f"note: {cache} holds Megatron's sample indices of the pair this replaced; "
              "remove it before Megatron reads the new one (it would reuse them)")
    eos = "" if done.eos is None else f" data.eos_id={done.eos}"  # for train.document_mask
    print(f"train on it with: data.path={done.out}{eos} (model.vocab_size at least "
          f"{done.vocab_size:,}; {done.out.with_suffix('.idx').name} beside it gives the ids' "
          f"type; Megatron reads the pair as --data-path {done.out.with_suffix('')})")
    return 0
