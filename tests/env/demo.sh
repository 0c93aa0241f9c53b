#!/usr/bin/env bash
# demo.sh: what `make demo` runs. For now it starts the local S3 server, shows that it
# works with a bucket and an object, prints the endpoints and stops; the end-to-end
# snapshot job replaces the middle once the sidecar serves.
source "$(dirname "$0")/lib.sh"

apt_install curl openssl
bash "$ENV_DIR/python.sh" install
if [[ ${1:-} != inside ]]; then
  exec bash "$ENV_DIR/run.sh" moto -- bash "$0" inside
fi

set -a; source "$SNAPCACHE_TEST_ENV"; set +a
aws=("$PYTHON_BIN/aws" --endpoint-url "$MOTO_ENDPOINT" --region us-east-1)
export AWS_ACCESS_KEY_ID=$MOTO_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$MOTO_SECRET_ACCESS_KEY
"${aws[@]}" s3 mb s3://snapcache-demo >/dev/null
echo "hello from snapcache" | "${aws[@]}" s3 cp - s3://snapcache-demo/git/example.com/demo/snapshot.tar.zst >/dev/null
echo
echo "Local components for this demo:"
sed 's/^/  /' "$SNAPCACHE_TEST_ENV"
echo
echo "Objects in s3://snapcache-demo:"
"${aws[@]}" s3 ls --recursive s3://snapcache-demo | sed 's/^/  /'
echo
echo "The sidecar does not serve yet; the demo stops the components now."
