// kubeletclient talks to a kubelet's API the way the API server and kubectl
// do, with client-go: exec over WebSocket (v5.channel.k8s.io, with the
// SPDY fallback kubectl uses) and port-forward over SPDY.
//
//	kubeletclient exec URL           (URL: https://host:port/exec/ns/pod/ctr?command=...)
//	kubeletclient portforward URL PORT   (URL: https://host:port/portForward/ns/pod)
//	  forwards a free local port to PORT in the pod and prints GET / through it
package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/tools/remotecommand"
	"k8s.io/client-go/transport/spdy"
)

func main() {
	if len(os.Args) < 3 {
		fail("usage: kubeletclient exec URL | portforward URL PORT")
	}
	cfg := &rest.Config{TLSClientConfig: rest.TLSClientConfig{Insecure: true}}
	u, err := url.Parse(os.Args[2])
	if err != nil {
		fail("url: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	switch os.Args[1] {
	case "exec":
		ws, err := remotecommand.NewWebSocketExecutor(cfg, "GET", u.String())
		if err != nil {
			fail("websocket executor: %v", err)
		}
		sp, err := remotecommand.NewSPDYExecutor(cfg, "POST", u)
		if err != nil {
			fail("spdy executor: %v", err)
		}
		ex, err := remotecommand.NewFallbackExecutor(ws, sp, func(error) bool { return false })
		if err != nil {
			fail("executor: %v", err)
		}
		var out, errb bytes.Buffer
		opts := remotecommand.StreamOptions{Stdout: &out, Stderr: &errb}
		if u.Query().Get("input") == "1" || u.Query().Get("stdin") == "true" {
			opts.Stdin = bytes.NewBufferString("from-stdin\n")
		}
		err = ex.StreamWithContext(ctx, opts)
		fmt.Print(out.String())
		fmt.Fprint(os.Stderr, errb.String())
		if err != nil {
			fail("exec: %v", err)
		}
	case "portforward":
		if len(os.Args) < 4 {
			fail("portforward needs a port")
		}
		port, _ := strconv.Atoi(os.Args[3])
		rt, upgrader, err := spdy.RoundTripperFor(cfg)
		if err != nil {
			fail("spdy: %v", err)
		}
		dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, "POST", u)
		stop, ready := make(chan struct{}), make(chan struct{})
		fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"},
			[]string{fmt.Sprintf("0:%d", port)}, stop, ready, io.Discard, os.Stderr)
		if err != nil {
			fail("portforward: %v", err)
		}
		errc := make(chan error, 1)
		go func() { errc <- fw.ForwardPorts() }()
		select {
		case <-ready:
		case err := <-errc:
			fail("forward: %v", err)
		case <-ctx.Done():
			fail("forward: timed out")
		}
		ports, err := fw.GetPorts()
		if err != nil || len(ports) == 0 {
			fail("ports: %v", err)
		}
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/", ports[0].Local))
		if err != nil {
			fail("GET through the forward: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Print(string(body))
		close(stop)
	default:
		fail("unknown command %q", os.Args[1])
	}
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	os.Exit(1)
}
