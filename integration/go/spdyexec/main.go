// spdyexec is a SPDY/3.1 exec client built on moby/spdystream, the SPDY
// implementation kubelet's and client-go's remotecommand use (with its own
// framer and zlib header dictionary). The integration tests build it with
// Debian's Go to check imacri's streaming server against a real peer:
//
//	spdyexec URL STDIN                      exec (prints a JSON result)
//	spdyexec -portforward URL PORT REQUEST  port-forward (prints the reply)
//	spdyexec -tty URL COLS ROWS             exec with a TTY, sending a resize
//
// exec upgrades with X-Stream-Protocol-Version v4.channel.k8s.io, opens the
// error, stdin, stdout and stderr streams as remotecommand does, writes
// STDIN and half-closes it, and reports what came back. port-forward
// upgrades with portforward.k8s.io and opens an error and a data stream for
// PORT (requestID 0) as kubelet's portforward client does, writes REQUEST,
// half-closes and prints everything the data stream returns.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/moby/spdystream"
)

// bufConn keeps the bytes the HTTP response reader buffered past the 101.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(p []byte) (int, error) { return c.r.Read(p) }

func fail(format string, a ...interface{}) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	os.Exit(1)
}

func main() {
	if len(os.Args) == 5 && os.Args[1] == "-portforward" {
		portForward(os.Args[2], os.Args[3], os.Args[4])
		return
	}
	if len(os.Args) == 5 && os.Args[1] == "-tty" {
		tty(os.Args[2], os.Args[3], os.Args[4])
		return
	}
	if len(os.Args) != 3 {
		fail("usage: spdyexec URL STDIN | spdyexec -portforward URL PORT REQUEST")
	}
	sc, protocol := upgrade(os.Args[1], "v4.channel.k8s.io", "channel.k8s.io")
	open := func(kind string) *spdystream.Stream {
		return openStream(sc, http.Header{"Streamtype": {kind}})
	}
	errStream := open("error")
	stdin := open("stdin")
	stdout := open("stdout")
	stderr := open("stderr")

	var wg sync.WaitGroup
	var out, errOut, status []byte
	read := func(s *spdystream.Stream, into *[]byte) {
		defer wg.Done()
		b, _ := ioutil.ReadAll(s)
		*into = b
	}
	wg.Add(3)
	go read(stdout, &out)
	go read(stderr, &errOut)
	go read(errStream, &status)
	if _, err := io.WriteString(stdin, os.Args[2]); err != nil {
		fail("stdin: %v", err)
	}
	stdin.Close()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		fail("timed out: stdout %q stderr %q status %q", out, errOut, status)
	}
	sc.Close()
	res, _ := json.Marshal(map[string]string{
		"protocol": protocol,
		"stdout":   string(out),
		"stderr":   string(errOut),
		"status":   string(status),
	})
	fmt.Println(string(res))
}

// upgrade performs the HTTP upgrade to SPDY/3.1 offering `protocols`.
func upgrade(raw string, protocols ...string) (*spdystream.Connection, string) {
	u, err := url.Parse(raw)
	if err != nil {
		fail("url: %v", err)
	}
	conn, err := net.DialTimeout("tcp", u.Host, 10*time.Second)
	if err != nil {
		fail("dial: %v", err)
	}
	req := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n", u.RequestURI(), u.Host)
	for _, p := range protocols {
		req += "X-Stream-Protocol-Version: " + p + "\r\n"
	}
	req += "Content-Length: 0\r\n\r\n"
	if _, err := conn.Write([]byte(req)); err != nil {
		fail("request: %v", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		fail("response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := ioutil.ReadAll(resp.Body)
		fail("upgrade refused: %s %s", resp.Status, body)
	}
	sc, err := spdystream.NewConnection(&bufConn{conn, br}, false)
	if err != nil {
		fail("spdy: %v", err)
	}
	go sc.Serve(spdystream.NoOpStreamHandler)
	return sc, resp.Header.Get("X-Stream-Protocol-Version")
}

func openStream(sc *spdystream.Connection, h http.Header) *spdystream.Stream {
	s, err := sc.CreateStream(h, nil, false)
	if err != nil {
		fail("stream %v: %v", h, err)
	}
	if err := s.WaitTimeout(10 * time.Second); err != nil {
		fail("stream %v reply: %v", h, err)
	}
	return s
}

func portForward(raw, port, request string) {
	sc, protocol := upgrade(raw, "portforward.k8s.io")
	if protocol != "portforward.k8s.io" {
		fail("negotiated %q", protocol)
	}
	h := http.Header{"Streamtype": {"error"}, "Port": {port}, "Requestid": {"0"}}
	errStream := openStream(sc, h)
	h = http.Header{"Streamtype": {"data"}, "Port": {port}, "Requestid": {"0"}}
	data := openStream(sc, h)
	if _, err := io.WriteString(data, request); err != nil {
		fail("write: %v", err)
	}
	// As client-go's portforward does: the data and the error stream are
	// each read to their end.
	reply := make(chan []byte)
	errs := make(chan []byte)
	go func() { b, _ := ioutil.ReadAll(data); reply <- b }()
	go func() { b, _ := ioutil.ReadAll(errStream); errs <- b }()
	var b, e []byte
	for got := 0; got < 2; got++ {
		select {
		case b = <-reply:
		case e = <-errs:
		case <-time.After(20 * time.Second):
			fail("port-forward timed out (data %q, error stream %q)", b, e)
		}
	}
	if len(e) > 0 {
		fail("port-forward error: %s", e)
	}
	os.Stdout.Write(b)
	sc.Close()
}

// tty runs an exec with a TTY as remotecommand does: error, stdin, stdout
// and resize streams (no stderr), a TerminalSize JSON on the resize stream.
func tty(raw, cols, rows string) {
	sc, protocol := upgrade(raw, "v4.channel.k8s.io")
	open := func(kind string) *spdystream.Stream {
		return openStream(sc, http.Header{"Streamtype": {kind}})
	}
	errStream := open("error")
	stdin := open("stdin")
	stdout := open("stdout")
	resize := open("resize")
	if _, err := fmt.Fprintf(resize, `{"Width":%s,"Height":%s}`, cols, rows); err != nil {
		fail("resize: %v", err)
	}
	outc := make(chan []byte)
	statc := make(chan []byte)
	go func() { b, _ := ioutil.ReadAll(stdout); outc <- b }()
	go func() { b, _ := ioutil.ReadAll(errStream); statc <- b }()
	var out, status []byte
	for got := 0; got < 2; got++ {
		select {
		case out = <-outc:
		case status = <-statc:
		case <-time.After(20 * time.Second):
			fail("tty exec timed out: %q %q", out, status)
		}
	}
	stdin.Close()
	sc.Close()
	res, _ := json.Marshal(map[string]string{
		"protocol": protocol,
		"stdout":   string(out),
		"status":   string(status),
	})
	fmt.Println(string(res))
}
