// nri-test-plugin: an NRI plugin for imacri's integration tests, built on
// upstream's plugin stub (github.com/containerd/nri/pkg/stub), so every byte
// imacri exchanges with it is what upstream's plugins send and expect.
//
// Its behaviour comes from a JSON config, given with -config (external
// plugins) or by the runtime in Configure (launched plugins, from
// <index>-<name>.conf):
//
//	{"events_file": "/tmp/x",     // append "EVENT pod/container" per event
//	 "adjust": {...},             // ContainerAdjustment (protojson) for CreateContainer
//	 "adjust_by_name": {"c": {...}}, // the same, for the container named c
//	 "crash_on": "CreateContainer", "hang_on": "StartContainer",
//	 "unsolicited_memory": 0}     // after Synchronize, ask to set this memory limit on every container
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"
	"google.golang.org/protobuf/encoding/protojson"
)

type config struct {
	EventsFile        string                     `json:"events_file"`
	Adjust            json.RawMessage            `json:"adjust"`
	AdjustByName      map[string]json.RawMessage `json:"adjust_by_name"`
	CrashOn           string                     `json:"crash_on"`
	HangOn            string                     `json:"hang_on"`
	UnsolicitedMemory int64                      `json:"unsolicited_memory"`
	// On StartContainer of this container, ask for an update of it (a
	// plugin calling back into the runtime from inside an event).
	UpdateOnStart string `json:"update_on_start"`
	// Validator: reject adjustments that add hooks, log who owns env vars.
	ValidateRejectHooks bool `json:"validate_reject_hooks"`
}

type plugin struct {
	mu     sync.Mutex
	cfg    config
	adjust *api.ContainerAdjustment
	byName map[string]*api.ContainerAdjustment
	stub   stub.Stub
}

func (p *plugin) load(text string) error {
	if text == "" {
		return nil
	}
	var c config
	if err := json.Unmarshal([]byte(text), &c); err != nil {
		return fmt.Errorf("config: %w", err)
	}
	p.cfg = c
	if len(c.Adjust) > 0 {
		a := &api.ContainerAdjustment{}
		if err := protojson.Unmarshal(c.Adjust, a); err != nil {
			return fmt.Errorf("adjust: %w", err)
		}
		p.adjust = a
	}
	p.byName = map[string]*api.ContainerAdjustment{}
	for n, raw := range c.AdjustByName {
		a := &api.ContainerAdjustment{}
		if err := protojson.Unmarshal(raw, a); err != nil {
			return fmt.Errorf("adjust_by_name %s: %w", n, err)
		}
		p.byName[n] = a
	}
	return nil
}

func (p *plugin) event(name, pod, ctr string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cfg.CrashOn == name {
		os.Exit(3)
	}
	if p.cfg.HangOn == name {
		time.Sleep(time.Hour)
	}
	if p.cfg.EventsFile == "" {
		return
	}
	f, err := os.OpenFile(p.cfg.EventsFile, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintf(f, "%s %s/%s\n", name, pod, ctr)
}

func (p *plugin) Configure(_ context.Context, config, runtime, version string) (stub.EventMask, error) {
	if config != "" {
		if err := p.load(config); err != nil {
			return 0, err
		}
	}
	p.event("Configure", runtime, version)
	return 0, nil
}

func (p *plugin) Synchronize(_ context.Context, pods []*api.PodSandbox, ctrs []*api.Container) ([]*api.ContainerUpdate, error) {
	p.event("Synchronize", fmt.Sprint(len(pods)), fmt.Sprint(len(ctrs)))
	for _, c := range ctrs {
		p.event("SyncContainer", c.Name, fmt.Sprintf("env=%d,mounts=%d", len(c.Env), len(c.Mounts)))
	}
	if p.cfg.UnsolicitedMemory > 0 {
		go func() {
			time.Sleep(200 * time.Millisecond)
			var u []*api.ContainerUpdate
			for _, c := range ctrs {
				cu := &api.ContainerUpdate{ContainerId: c.Id}
				cu.SetLinuxMemoryLimit(p.cfg.UnsolicitedMemory)
				u = append(u, cu)
			}
			failed, err := p.stub.UpdateContainers(u)
			p.event("UpdateContainersResult", fmt.Sprint(len(failed)), fmt.Sprint(err))
		}()
	}
	return nil, nil
}

func (p *plugin) RunPodSandbox(_ context.Context, pod *api.PodSandbox) error {
	// The namespace types the runtime reports for the pod, in order.
	var types []string
	for _, n := range pod.GetLinux().GetNamespaces() {
		types = append(types, n.Type)
	}
	p.event("RunPodSandbox", pod.Name, strings.Join(types, ","))
	return nil
}
func (p *plugin) UpdatePodSandbox(_ context.Context, pod *api.PodSandbox, _, res *api.LinuxResources) error {
	p.event("UpdatePodSandbox", pod.Name, fmt.Sprint(res.GetCpu().GetShares().GetValue()))
	return nil
}
func (p *plugin) PostUpdatePodSandbox(_ context.Context, pod *api.PodSandbox) error {
	p.event("PostUpdatePodSandbox", pod.Name, "")
	return nil
}
func (p *plugin) StopPodSandbox(_ context.Context, pod *api.PodSandbox) error {
	p.event("StopPodSandbox", pod.Name, "")
	return nil
}
func (p *plugin) RemovePodSandbox(_ context.Context, pod *api.PodSandbox) error {
	p.event("RemovePodSandbox", pod.Name, "")
	return nil
}
func (p *plugin) CreateContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	p.event("CreateContainer", pod.Name, c.Name)
	if v, ok := c.Annotations["nri-test/fail"]; ok {
		return nil, nil, fmt.Errorf("refusing container: %s", v)
	}
	if a, ok := p.byName[c.Name]; ok {
		return a, nil, nil
	}
	return p.adjust, nil, nil
}
func (p *plugin) PostCreateContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) error {
	p.event("PostCreateContainer", pod.Name, c.Name)
	return nil
}
func (p *plugin) StartContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) error {
	p.event("StartContainer", pod.Name, c.Name)
	if p.cfg.UpdateOnStart != "" && p.cfg.UpdateOnStart == c.Name {
		cu := &api.ContainerUpdate{ContainerId: c.Id}
		cu.SetLinuxMemoryLimit(300 << 20)
		failed, err := p.stub.UpdateContainers([]*api.ContainerUpdate{cu})
		p.event("UpdateContainersResult", fmt.Sprint(len(failed)), fmt.Sprint(err))
	}
	return nil
}
func (p *plugin) PostStartContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) error {
	p.event("PostStartContainer", pod.Name, c.Name)
	return nil
}
func (p *plugin) UpdateContainer(_ context.Context, pod *api.PodSandbox, c *api.Container, r *api.LinuxResources) ([]*api.ContainerUpdate, error) {
	p.event("UpdateContainer", pod.Name, c.Name)
	return nil, nil
}
func (p *plugin) PostUpdateContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) error {
	p.event("PostUpdateContainer", pod.Name, c.Name)
	return nil
}
func (p *plugin) StopContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) ([]*api.ContainerUpdate, error) {
	p.event("StopContainer", pod.Name, c.Name)
	return nil, nil
}
func (p *plugin) RemoveContainer(_ context.Context, pod *api.PodSandbox, c *api.Container) error {
	p.event("RemoveContainer", pod.Name, c.Name)
	return nil
}

// validator is the plugin plus ValidateContainerAdjustment, which makes the
// stub subscribe it to validation.
type validator struct{ *plugin }

func (v validator) ValidateContainerAdjustment(_ context.Context, req *api.ValidateContainerAdjustmentRequest) error {
	owners := req.GetOwners().GetOwners()[req.GetContainer().GetId()]
	envOwners := []string{}
	for k, o := range owners.GetCompound()[int32(api.Field_Env)].GetOwners() {
		envOwners = append(envOwners, k+":"+o)
	}
	sort.Strings(envOwners)
	hooksOwner := owners.GetSimple()[int32(api.Field_OciHooks)]
	consulted := []string{}
	for _, p := range req.GetPlugins() {
		consulted = append(consulted, p.Index+"-"+p.Name)
	}
	v.event("Validate", req.GetContainer().GetName(),
		fmt.Sprintf("env=%s hooks=%s consulted=%s", strings.Join(envOwners, ","), hooksOwner, strings.Join(consulted, ",")))
	h := req.GetAdjust().GetHooks()
	if v.cfg.ValidateRejectHooks && h != nil && len(h.Prestart)+len(h.CreateRuntime)+len(h.CreateContainer)+
		len(h.StartContainer)+len(h.Poststart)+len(h.Poststop) > 0 {
		return fmt.Errorf("hooks are not allowed on this node (added by %s)", hooksOwner)
	}
	return nil
}

func main() {
	var (
		name   = flag.String("name", "", "plugin name (external plugins)")
		idx    = flag.String("idx", "", "plugin index (external plugins)")
		socket = flag.String("socket", "", "NRI socket (external plugins)")
		cfg    = flag.String("config", "", "JSON config (external plugins)")
	)
	flag.Parse()
	p := &plugin{}
	if err := p.load(*cfg); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	var opts []stub.Option
	if *name != "" {
		opts = append(opts, stub.WithPluginName(*name))
	}
	if *idx != "" {
		opts = append(opts, stub.WithPluginIdx(*idx))
	}
	if *socket != "" {
		opts = append(opts, stub.WithSocketPath(*socket))
	}
	var impl interface{} = p
	if p.cfg.ValidateRejectHooks {
		impl = validator{p}
	}
	s, err := stub.New(impl, opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	p.stub = s
	if err := s.Run(context.Background()); err != nil {
		fmt.Fprintln(os.Stderr, "plugin exited:", err)
		os.Exit(1)
	}
}
