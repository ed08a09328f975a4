//go:build tools

// Upstream's sample NRI plugins that the Go module proxy serves: the ones
// inside the github.com/containerd/nri module itself (later releases moved
// every sample into nested modules the proxy does not serve). Built with
// `go build github.com/containerd/nri/plugins/<name>` against the pinned
// version in go.mod.
package tools

import _ "github.com/containerd/nri/plugins/ulimit-adjuster"
