"""The adapter API is typed: mypy --strict accepts a fully annotated adapter
(tests/typed_adapter.py) and, through it, the public modules of pitboss_worker.
Skipped where mypy is not installed (.ci/run installs it)."""

import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON = os.path.dirname(HERE)

try:
    import mypy  # noqa: F401

    HAVE_MYPY = True
except ImportError:
    HAVE_MYPY = False


class TypesTest(unittest.TestCase):
    def test_the_package_ships_py_typed(self):
        self.assertTrue(os.path.isfile(os.path.join(PYTHON, "pitboss_worker", "py.typed")))

    @unittest.skipUnless(HAVE_MYPY, "mypy is not installed")
    def test_a_typed_adapter_passes_mypy_strict(self):
        env = dict(os.environ, MYPYPATH=PYTHON)
        out = subprocess.run(
            [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
             os.path.join(HERE, "typed_adapter.py")],
            cwd=PYTHON, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=300,
        )
        self.assertEqual(out.returncode, 0, out.stdout.decode("utf-8", "replace"))

    @unittest.skipUnless(HAVE_MYPY, "mypy is not installed")
    def test_a_wrongly_typed_use_is_caught(self):
        # The check has teeth: a str where the API gives an int is an error.
        bad = os.path.join(HERE, "_typed_bad.py")
        with open(bad, "w") as f:
            f.write("from pitboss_worker import Request\n\n\n"
                    "def f(req: Request) -> str:\n    return req.attempt\n")
        try:
            env = dict(os.environ, MYPYPATH=PYTHON)
            out = subprocess.run(
                [sys.executable, "-m", "mypy", "--strict", "--no-incremental", bad],
                cwd=PYTHON, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                timeout=300,
            )
        finally:
            os.unlink(bad)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("Incompatible return value", out.stdout.decode("utf-8", "replace"))


if __name__ == "__main__":
    unittest.main()
