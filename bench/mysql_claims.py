"""Deadlocks between pushes with client stamps on MySQL: how many batches failed
(and how many pushes were pushed again) while three gunicorn processes stored
the same pushes.

    python bench/mysql_claims.py [--runs 6] [--comet DIR ...]

Each run is ``deliver`` of tests/test_deploy.py on a fresh database of the local
MariaDB: 500 pushes with stamps, each to 1-3 of 10 clients, from 5 pushers, to
3 gthread workers, every client polling; the run must deliver every package
once.  It counts the deadlocks the workers logged and the pushes answered 503
and pushed again.  With several ``--comet`` directories the runs alternate
between them, one each in turn, so that a slow minute of the machine hurts
each alike; the repository's comet.py by default.
"""

import argparse
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6, help="runs per comet.py")
    parser.add_argument("--comet", action="append", help="a directory holding a comet.py")
    args = parser.parse_args()
    sys.path[:0] = [os.path.join(ROOT, "tests")]
    import test_deploy
    from support import MariaDB

    served = [os.path.abspath(directory) for directory in args.comet or [ROOT]]
    totals = {directory: [0, 0, 0] for directory in served}    # deadlocks, pushed again, lost
    server = MariaDB()
    with tempfile.TemporaryDirectory() as scratch:
        for run in range(args.runs):
            for directory in served:
                # The version under test, with the repository's application beside it.
                # `python -m gunicorn` puts its working directory first on sys.path.
                tree = os.path.join(scratch, f"{served.index(directory)}")
                if not os.path.isdir(tree):
                    shutil.copytree(os.path.join(ROOT, "examples"), os.path.join(tree, "examples"))
                    shutil.copy(os.path.join(directory, "comet.py"), tree)
                test_deploy.ROOT, test_deploy.EXAMPLES = tree, os.path.join(tree, "examples")
                os.chdir(tree)
                url = server.create_database()
                logs = tempfile.mkdtemp(dir=scratch)
                try:
                    gunicorn = test_deploy.Gunicorn(logs, url, "gthread", 3, "--threads", "32")
                    with gunicorn:
                        delivery = test_deploy.deliver(gunicorn.url)
                        with open(gunicorn.log_path) as log:
                            deadlocks = log.read().count("Deadlock found")
                    try:
                        test_deploy.assert_delivered(delivery, url)
                        lost = 0
                    except AssertionError as error:
                        lost = 1
                        print(error, file=sys.stderr)
                finally:
                    server.drop_databases()
                totals[directory][0] += deadlocks
                totals[directory][1] += len(delivery.retried)
                totals[directory][2] += lost
                print(f"run {run + 1}, {directory}: {deadlocks} deadlocks,"
                      f" {len(delivery.retried)} pushes pushed again"
                      f"{', a package lost or gained' if lost else ''}", flush=True)
    for directory, (deadlocks, again, lost) in totals.items():
        print(f"{directory}: {args.runs} runs, {deadlocks} deadlocks, {again} pushes pushed"
              f" again, {lost} runs that lost or gained a package")


if __name__ == "__main__":
    main()
