#!/bin/sh
# Rebuild kjv.txt.gz from Debian's bible-kjv packages (version 4.38 was used).
# Needs a Debian/Ubuntu machine with apt sources; runs unprivileged except for
# `apt-get update` if the package lists are missing. Output is byte-identical for
# the same package version (gzip -n omits the timestamp).
set -eu
out_dir=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
apt-get download bible-kjv-text bible-kjv
dpkg-deb -x bible-kjv-text_*_all.deb text
dpkg-deb -x bible-kjv_*.deb prog
# Pretty-printed dump of the whole text, no line wrapping: a "Book N" heading, a blank
# line, then "  V verse text" lines, chapter after chapter.
prog/usr/bin/bible -l 100000 -p "$work/text/usr/lib" "Gen1:1-Rev22:21" </dev/null > pretty.txt
# One document per chapter: heading line, verse lines ("V text"), then one blank line.
awk '
  /^$/ { next }
  /^  [0-9]+ / { sub(/^  /, ""); print; next }
  { if (n++) print ""; print }
  END { print "" }
' pretty.txt > kjv.txt
gzip -9 -n -c kjv.txt > "$out_dir/kjv.txt.gz"
echo "chapters: $(grep -c '^$' kjv.txt)  bytes: $(wc -c < kjv.txt)  sha256: $(sha256sum kjv.txt | cut -d' ' -f1)"
