// criclient is a CRI client on grpc-go and k8s.io/cri-api, the libraries
// kubelet and crictl use. It calls imacri over its unix socket with a given
// :authority (older grpc-go, grpc-java and grpcurl send the socket path) and
// runs a pod without a hostname, as crictl's example configs do.
//
//	criclient -socket /run/imacri/imacri.sock -authority /run/imacri/imacri.sock
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

func main() {
	socket := flag.String("socket", "/run/imacri/imacri.sock", "CRI socket")
	authority := flag.String("authority", "", ":authority to send (empty: grpc-go's default)")
	pod := flag.Bool("pod", false, "also run, stop and remove a pod without hostname")
	flag.Parse()

	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if *authority != "" {
		opts = append(opts, grpc.WithAuthority(*authority))
	}
	conn, err := grpc.NewClient("unix://"+*socket, opts...)
	if err != nil {
		fail("dial: %v", err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rt := runtime.NewRuntimeServiceClient(conn)
	im := runtime.NewImageServiceClient(conn)

	v, err := rt.Version(ctx, &runtime.VersionRequest{Version: "v1"})
	if err != nil {
		fail("Version: %v", err)
	}
	fmt.Printf("version %s %s %s\n", v.RuntimeName, v.RuntimeVersion, v.RuntimeApiVersion)
	if _, err := rt.Status(ctx, &runtime.StatusRequest{}); err != nil {
		fail("Status: %v", err)
	}
	if _, err := im.ListImages(ctx, &runtime.ListImagesRequest{}); err != nil {
		fail("ListImages: %v", err)
	}
	// A stop of an unknown pod succeeds, as on containerd.
	if _, err := rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: "no-such-pod"}); err != nil {
		fail("StopPodSandbox(unknown): %v", err)
	}
	if *pod {
		r, err := rt.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: &runtime.PodSandboxConfig{
			Metadata: &runtime.PodSandboxMetadata{Name: "grpc-go", Namespace: "default", Uid: fmt.Sprintf("grpc-go-%d", os.Getpid())},
			Linux:    &runtime.LinuxPodSandboxConfig{},
		}})
		if err != nil {
			fail("RunPodSandbox: %v", err)
		}
		st, err := rt.PodSandboxStatus(ctx, &runtime.PodSandboxStatusRequest{PodSandboxId: r.PodSandboxId})
		if err != nil {
			fail("PodSandboxStatus: %v", err)
		}
		fmt.Printf("pod %s %s\n", r.PodSandboxId, st.Status.State)
		if _, err := rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: r.PodSandboxId}); err != nil {
			fail("StopPodSandbox: %v", err)
		}
		if _, err := rt.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: r.PodSandboxId}); err != nil {
			fail("RemovePodSandbox: %v", err)
		}
	}
	fmt.Println("ok")
}

func fail(format string, a ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", a...)
	os.Exit(1)
}
