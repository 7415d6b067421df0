#!/usr/bin/env bash
# Fetch Apicurio Registry (the schema registry of the format tests: its Confluent-compatible
# "ccompat" API) from Maven Central once per machine, unpacked into the user's cache.
#
#   scripts/fetch-apicurio.sh        # prints the directory holding the runnable jar
#
# 3.3.3 needs Java >= 21 (class file 65): used when such a Java is found (JAVA_HOME, java
# on PATH, or a JDK under /usr/lib/jvm); else 3.0.9, which runs on Java 17 (its archive is
# the legacy-jar layout: apicurio-registry-app-3.0.9-runner.jar); APICURIO_JAVA picks the
# java. Idempotent: ~0.1 s when
# cached; cold ~10 s (a 110-160 MB download). The chosen java is written to <dir>/java.
set -euo pipefail

CACHE="${THREADS_CONNECTOR_CACHE:-$HOME/.cache/threads-connector}"

java_major() {  # the feature version of a java binary ("17", "25"), or nothing
  "$1" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p'
}

find_java21() {
  local candidate
  for candidate in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
    [[ -n "$candidate" && -x "$candidate" ]] || continue
    if (( $(java_major "$candidate" || echo 0) >= 21 )); then
      echo "$candidate"; return 0
    fi
  done
  return 1
}

# APICURIO_JAVA: the java to run it with (the version follows from it)
JAVA="${APICURIO_JAVA:-$(find_java21 || command -v java || true)}"
[[ -n "$JAVA" && -x "$JAVA" ]] || { echo "fetch-apicurio: no java found (Java 17+ needed)" >&2; exit 1; }
if (( $(java_major "$JAVA" || echo 0) >= 21 )); then
  VERSION="${APICURIO_VERSION:-3.3.3}"; JAR=quarkus-run.jar
else
  VERSION="${APICURIO_VERSION:-3.0.9}"; JAR="apicurio-registry-app-${VERSION}-runner.jar"
fi
DIR="$CACHE/apicurio-$VERSION"
if [[ -f "$DIR/.complete" ]]; then
  echo "$DIR"; exit 0
fi
command -v mvn >/dev/null || { echo "fetch-apicurio: Maven (mvn) is not on PATH" >&2; exit 1; }
mkdir -p "$CACHE"
exec 9>"$CACHE/.apicurio.lock"
flock 9   # two test sessions fetching at once: the second waits, then finds it cached
if [[ ! -f "$DIR/.complete" ]]; then
  mvn -q -B dependency:get -Dtransitive=false \
    "-Dartifact=io.apicurio:apicurio-registry-app:${VERSION}:tar.gz:all" >&2
  ARCHIVE="$HOME/.m2/repository/io/apicurio/apicurio-registry-app/$VERSION/apicurio-registry-app-$VERSION-all.tar.gz"
  rm -rf "$DIR.tmp" && mkdir -p "$DIR.tmp"
  tar xzf "$ARCHIVE" -C "$DIR.tmp"
  RUNNABLE="$(find "$DIR.tmp" -maxdepth 2 -name "$JAR" | head -1)"
  [[ -n "$RUNNABLE" ]] || { echo "fetch-apicurio: $JAR not in $ARCHIVE" >&2; exit 1; }
  echo "$RUNNABLE" | sed "s#^$DIR.tmp#$DIR#" > "$DIR.tmp/jar"
  rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
  touch "$DIR/.complete"
fi
echo "$JAVA" > "$DIR/java"
echo "$DIR"
