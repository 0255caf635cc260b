"""attune chat-user add FILE USER: add a user to the chat page's users file, or set a new password.

    attune chat-user add chat-users ada                          # asks for the password twice
    printf '%s\n' "$PASSWORD" | attune chat-user add chat-users ada --password-stdin
    attune chat --host 0.0.0.0 --users-file chat-users
    kubectl create secret generic attune-chat-users --from-file=users=chat-users   # the RayService's

The file holds `user:scrypt$N$r$p$salt$hash` lines (salted hashes, never passwords); to remove a
user, delete their line.
"""

import getpass

import sys

HELP = "add a user to the chat page's users file (passwords stored hashed)"


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="chat_user_command", required=True)
    add = sub.add_parser("add", help="add USER to FILE (made if absent), or set their new password")
    add.add_argument("file", help="the users file, e.g. chat-users")
    add.add_argument("user", help="user name (no ':')")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of stdin instead of prompting")


def run(args) -> int:
    from attune.ui.passwords import UsersError, add_user

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"Password for {args.user}: ")
        if getpass.getpass("Again: ") != password:
            print("attune: the passwords do not match", file=sys.stderr)
            return 2
    try:
        add_user(args.file, args.user, password)
    except (UsersError, OSError) as e:
        print(f"attune: {e}", file=sys.stderr)
        return 2
    print(f"[attune] {args.user} can sign in to the chat page with {args.file}", file=sys.stderr)
    return 0
